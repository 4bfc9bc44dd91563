"""Tests never touch the network: '--data auto' resolves to the synthetic corpus."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
