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
    with pytest.raises(ValueError, match="TURBOTUNE_BACKEND=.fastest. is not valid.*aten"):
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


@pytest.fixture
def dummy_op():
    """A throw-away op with an ATen CPU kernel for float32/bfloat16."""
    backend.register_op("dummy_aten_op", aten_cpu_dtypes=(torch.float32, torch.bfloat16),
                        aten_description="ATen's dummy kernel")
    yield "dummy_aten_op"
    backend._OPS.pop("dummy_aten_op", None)
    backend.select_cached.cache_clear()


def test_aten_backend_is_chosen_after_native_and_before_reference(dummy_op):
    with backend.force(None):
        c = backend.select(dummy_op, torch.device("cpu"), torch.float32)
        assert c.impl == backend.ATEN and c.reason == "ATen's dummy kernel"
        assert backend.select(dummy_op, torch.device("cpu"), torch.float16).impl == backend.REFERENCE
        assert backend.explain(torch.device("cpu"))[dummy_op]["bfloat16"].impl == backend.ATEN
        backend.update_op(dummy_op, native_cpu_dtypes=(torch.float32,))  # a native kernel arrives later
        assert backend.select(dummy_op, torch.device("cpu"), torch.float32).impl == backend.NATIVE
        assert backend.select(dummy_op, torch.device("cpu"), torch.bfloat16).impl == backend.ATEN
    with backend.force(backend.REFERENCE):
        assert backend.select(dummy_op, torch.device("cpu"), torch.float32).impl == backend.REFERENCE


def test_forced_aten(dummy_op):
    with backend.force(backend.ATEN):
        assert "forced by TURBOTUNE_BACKEND=aten" in backend.select(dummy_op, torch.device("cpu"), torch.float32).reason
        with pytest.raises(backend.BackendUnavailable, match="no ATen cpu kernel for torch.float16"):
            backend.select(dummy_op, torch.device("cpu"), torch.float16)
        with pytest.raises(backend.BackendUnavailable, match="no ATen kernel for cuda tensors"):
            backend.select(dummy_op, torch.device("cuda"), torch.float32)
        # an op without an ATen kernel keeps its default
        assert backend.select("layer_norm", torch.device("cpu"), torch.float32).impl == backend.REFERENCE


def test_update_op_unknown_name():
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        backend.update_op("nope", native_cpu_dtypes=())


def test_checks_enabled(monkeypatch):
    monkeypatch.delenv(backend.CHECK_ENV_VAR, raising=False)
    assert not backend.checks_enabled()
    monkeypatch.setenv(backend.CHECK_ENV_VAR, "1")
    assert backend.checks_enabled()
