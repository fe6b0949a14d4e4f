"""Reading and writing tensor files, lazily and atomically.

* :mod:`.readers`  lazy tensor stores that plan from file headers and read one tensor at a time
* :mod:`.writers`  streaming safetensors (sharded, with an HF index) and ``.npz`` writers
* :mod:`.atomic`   output directories that appear all at once, or not at all
"""
from .atomic import atomic_output_dir, atomic_output_file
from .readers import TensorInfo, TensorStore, open_tensors
from .writers import SafetensorsWriter, NpzWriter, parse_size

__all__ = [
    "TensorInfo", "TensorStore", "open_tensors",
    "SafetensorsWriter", "NpzWriter", "parse_size",
    "atomic_output_dir", "atomic_output_file",
]
