"""Backend selection and native-extension status."""
import pytest
import torch

from turbotune import _native, backend


def test_native_extension_loads_and_reports():
    st = _native.status()
    assert st.loaded, st.error
    assert st.threads >= 1
    summary = st.cuda_summary()
    if st.cuda_built and not torch.cuda.is_available():
        # Built with nvcc on a machine without a driver: must say so, not crash.
        assert summary.startswith("CUDA extension built, no usable driver"), summary
        assert not st.cuda_usable
    elif not st.cuda_built:
        assert "not built" in summary


def test_default_choice_on_cpu_is_reference_for_triton_only_op():
    with backend.force(None):
        c = backend.select("layer_norm", torch.device("cpu"), torch.float32)
    assert c.impl == backend.REFERENCE
    assert "no native cpu kernel" in c.reason


def test_forced_reference():
    with backend.force("reference"):
        assert backend.select("layer_norm", torch.device("cpu"), torch.float16).impl == backend.REFERENCE


def test_forced_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backend.force("triton"):
        c = backend.select("layer_norm", torch.device("cpu"), torch.bfloat16)
    assert c.impl == backend.TRITON and "forced" in c.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure message")
def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.force("triton"):
        with pytest.raises(backend.BackendUnavailable, match="TRITON_INTERPRET=1"):
            backend.select("layer_norm", torch.device("cpu"), torch.float32)


def test_forced_path_missing_for_op_keeps_default():
    """An op without a native implementation ignores TURBOTUNE_BACKEND=native."""
    with backend.force("native"):
        assert backend.select("layer_norm", torch.device("cpu"), torch.float32).impl == backend.REFERENCE


def test_float64_never_goes_to_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backend.force("triton"):
        with pytest.raises(backend.BackendUnavailable, match="no Triton kernel for torch.float64"):
            backend.select("layer_norm", torch.device("cpu"), torch.float64)


def test_invalid_env_value(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="TURBOTUNE_BACKEND='fastest' is not valid"):
        backend.forced()


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        backend.select("nope", torch.device("cpu"), torch.float32)


def test_explain_lists_registered_ops():
    table = backend.explain(torch.device("cpu"))
    assert "layer_norm" in table
    assert set(table["layer_norm"]) == {"float32", "float16", "bfloat16"}


def test_require_reports_missing_extension(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("libfoo.so: cannot open shared object file"))
    with pytest.raises(RuntimeError, match="tokenizer needs the compiled extension.*libfoo.so"):
        _native.require("tokenizer")
