import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
os.environ.setdefault("PWSELF_CACHE_DIR", tempfile.mkdtemp(prefix="pwself-test-cache-"))  # never ~/.cache
