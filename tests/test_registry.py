"""The generic registry and the method/model registries built on it."""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint

import pytest
import torch

import harness.registry as registry_module
from harness.errors import HarnessError, UnknownNameError
from harness.models import MODELS
from harness.registry import Registry
from methods import METHODS, AttentionMethod, build_method, register_method


@pytest.mark.parametrize(
    ("registry", "alias", "canonical"),
    [
        (METHODS, "dense", "sdpa"),
        (METHODS, "default", "sdpa"),
        (METHODS, "reference", "math"),
        (METHODS, "flash", "fa2"),
        (METHODS, "flash-attn2", "fa2"),
        (MODELS, "tiny", "wan-tiny"),
        (MODELS, "wan-1.3b", "wan1.3b"),
        (MODELS, "wan2.1-t2v-14b", "wan14b"),
    ],
)
def test_alias_resolves_to_canonical_name(registry: Registry, alias: str, canonical: str) -> None:
    """An alias resolves to its registered name and to the same object."""
    assert registry.canonical(alias) == canonical
    assert registry.get(alias) is registry.get(canonical)
    assert alias in registry.aliases_of(canonical)


def test_lazy_entry_imports_module_on_get(tmp_path, monkeypatch) -> None:
    """A lazy "module:attr" entry is listed without importing and imported on first get."""
    module_name = "lazy_registry_probe_mod"
    (tmp_path / f"{module_name}.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    reg: Registry[type] = Registry("thing")
    reg.add("lazy", f"{module_name}:Thing", aliases=("lz",))

    assert reg.names() == ["lazy"]
    assert module_name not in sys.modules
    thing = reg.get("lz")
    assert module_name in sys.modules
    assert thing is sys.modules[module_name].Thing
    assert reg.get("lazy") is thing


def test_lazy_entry_without_attr_is_rejected_on_get() -> None:
    """A lazy target that is not "module:attr" fails with a clear ValueError."""
    reg: Registry[type] = Registry("thing")
    reg.add("broken", "just_a_module_name")
    with pytest.raises(ValueError, match="module:attr"):
        reg.get("broken")


@pytest.mark.parametrize(
    ("registry", "typo", "suggestion"),
    [(METHODS, "sdpaa", "sdpa"), (METHODS, "cudn", "cudnn"), (MODELS, "wan1.3", "wan1.3b"), (METHODS, "SDPA", "sdpa")],
)
def test_unknown_name_suggests_closest(registry: Registry, typo: str, suggestion: str) -> None:
    """An unknown name raises UnknownNameError (a HarnessError) naming the closest valid name."""
    with pytest.raises(UnknownNameError) as info:
        registry.get(typo)
    message = str(info.value)
    assert isinstance(info.value, HarnessError)
    assert "Did you mean" in message
    assert repr(suggestion) in message
    assert message.startswith(f"unknown {registry.kind} {typo!r}")


def test_unknown_name_without_close_match_lists_known_names() -> None:
    """A name far from every entry gets no suggestion but the list of known names."""
    with pytest.raises(UnknownNameError) as info:
        METHODS.get("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Known:" in str(info.value) and "sdpa" in str(info.value)


def test_duplicate_registration_raises() -> None:
    """Registering a second object under a taken name raises ValueError."""
    reg: Registry[type] = Registry("thing")

    @reg.register("one")
    class One:
        pass

    with pytest.raises(ValueError, match="already registered"):

        @reg.register("one")
        class Other:
            pass

    assert reg.get("one") is One


def test_reregistering_same_object_is_allowed() -> None:
    """Re-adding the very same object under its name is a no-op, not an error."""
    reg: Registry[type] = Registry("thing")
    obj = object()
    reg.add("same", obj)
    reg.add("same", obj)
    assert reg.get("same") is obj


def test_alias_collision_raises() -> None:
    """An alias already owned by another name (or equal to an entry name) is rejected."""
    reg: Registry[object] = Registry("thing")
    reg.add("a", object(), aliases=("x",))
    with pytest.raises(ValueError, match="alias 'x'"):
        reg.add("b", object(), aliases=("x",))
    with pytest.raises(ValueError, match="alias 'a'"):
        reg.add("c", object(), aliases=("a",))


def test_entry_point_plugins_are_loaded_lazily(monkeypatch) -> None:
    """Entries advertised through the registry's entry-point group appear on first lookup."""
    group = "attention_bench.test_plugins"
    fake = [EntryPoint(name="plugged", value="collections:OrderedDict", group=group)]
    seen: list[str] = []

    def fake_entry_points(group: str = ""):  # type: ignore[no-untyped-def]
        seen.append(group)
        return fake

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    reg: Registry[type] = Registry("thing", entry_point_group=group)
    assert seen == []
    import collections

    assert reg.get("plugged") is collections.OrderedDict
    assert "plugged" in reg.names()
    assert seen == [group]


class _ExternalDense(AttentionMethod):
    """A method defined outside the repository: plain dense attention."""

    def attend(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), 1.0


@pytest.fixture
def external_method():
    """Register ``_ExternalDense`` as ``ext-dense`` (alias ``ext``) for one test, then remove it."""
    cls = register_method("ext-dense", aliases=("ext",))(_ExternalDense)
    try:
        yield cls
    finally:
        METHODS.remove("ext-dense")


def test_external_method_is_buildable_by_name(external_method) -> None:
    """A method registered with methods.register_method is built by its name and alias."""
    method = build_method("ext")
    assert isinstance(method, external_method)
    assert method.name == "ext-dense"
    assert METHODS.canonical("ext") == "ext-dense"
    assert "ext-dense" in METHODS.names()


def test_external_method_is_listed_by_cli(external_method, bench) -> None:
    """`bench methods --json` lists an externally registered method with its aliases."""
    rows = json.loads(bench("methods", "--json").stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["ext-dense"]["aliases"] == ["ext"]
    assert {"sdpa", "math", "fa2", "cudnn"} <= set(by_name)


def test_removed_method_does_not_leak() -> None:
    """After removal a method and its aliases are unknown again."""
    register_method("ext-temp", aliases=("ext-temp-alias",))(type("Tmp", (_ExternalDense,), {}))
    METHODS.remove("ext-temp")
    assert "ext-temp" not in METHODS
    assert "ext-temp-alias" not in METHODS
    with pytest.raises(UnknownNameError):
        build_method("ext-temp-alias")
