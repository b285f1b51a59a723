import os

import pytest

# torch must be imported before usearch in a process that later uses torch.export: importing
# usearch 2.26.6 first breaks torch's C++ schema printing (str(aten.conv2d._schema) is cut at
# "stride=[") and every export fails inside torchgen. Test modules import the (torch-free) bank
# early, so import torch here first. Runtime tests block torch in their own subprocesses.
try:
    import torch  # noqa: F401
except ImportError:
    pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _flush_denormal():
    try:
        import torch
    except ImportError:  # runtime tests run without torch
        yield
        return
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    yield


def tiny_config(**retrieval):
    """A very small TinyAlign config for tests (tiny SigLIP-style tower, 2-layer LM)."""
    from tinyalign.config import LMConfig, ModelConfig, RetrievalConfig, VisionConfig, VisionKind

    return ModelConfig(
        preset="test",
        vision=VisionConfig(kind=VisionKind.SIGLIP, image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                            num_heads=2, intermediate_size=64, feature_layer=-1),
        lm=LMConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=64),
        retrieval=RetrievalConfig(**{"k": 2, "caption_len": 4, "value_tokens": 2, "value_dim": 8, **retrieval}),
    )
