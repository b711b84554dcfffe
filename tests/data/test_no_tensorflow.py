"""transfer.data and `transfer data` work with TensorFlow and Keras blocked."""

from __future__ import annotations

import subprocess
import sys

CODE = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import transfer.data.image, transfer.data.folder, transfer.data.splits
import transfer.data.batches, transfer.data.datasets, transfer.commands.data
assert not any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)
print('ok')
"""


def test_data_imports_without_tensorflow():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
