# Imported by every Python process started with this folder on PYTHONPATH (dry_run_gpu_tests.sh
# puts it there): with GPUMESH_EMULATED_GPU=1, the main job's worker processes (the worker
# server, or each spawned worker) get the emulated GPU runtime as the test process does (see
# ../emulated_gpu.py).
import os

if os.environ.get("GPUMESH_EMULATED_GPU") == "1":
    import emulated_gpu  # noqa: F401
