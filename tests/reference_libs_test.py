"""``reference_libs.importorskip``: skips when a library is missing, imports it only when a test uses it."""

import sys

import pytest
import reference_libs


def test_a_missing_library_skips_the_module():
    with pytest.raises(pytest.skip.Exception, match="jaxlm_no_such_library"):
        reference_libs.importorskip("jaxlm_no_such_library")


def test_the_library_is_imported_at_the_first_public_attribute_only(tmp_path, monkeypatch):
    (tmp_path / "jaxlm_lazy_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jaxlm_lazy_probe", raising=False)
    probe = reference_libs.importorskip("jaxlm_lazy_probe")
    # What pytest's collection reads of every module-level name must not import it.
    assert getattr(probe, "__pytest_wrapped__", None) is None
    assert getattr(probe, "_fixture_function_marker", None) is None
    assert "jaxlm_lazy_probe" not in sys.modules
    assert probe.VALUE == 42
    assert "jaxlm_lazy_probe" in sys.modules
