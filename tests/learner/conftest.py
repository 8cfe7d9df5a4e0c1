import pytest


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """Same architecture and tokenizer as `tiny_model_dir`, different random weights."""
    from pyvision_rl.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny_other") / "model", seed=1))
