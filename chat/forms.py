from __future__ import annotations

from django import forms
from django.contrib.auth.forms import UserCreationForm


class RenameForm(forms.Form):
    title = forms.CharField(max_length=200, strip=True)


class SignupForm(UserCreationForm):
    """Username and password twice, with Django's password validators."""
