"""The programs of reproduce.py, one module each; they import tartan.py, never the other way."""
