from __future__ import annotations

from diffeat.core.hookspecs import hookimpl
from diffeat.core.plugins import PluginManager
from diffeat.testing import ColorBlurExtractor


class Misspelled:
    @hookimpl
    def register_extractor(self, register):  # missing the final "s"
        register("never", ColorBlurExtractor)


class Raising:
    @hookimpl
    def register_matchers(self, register):
        raise RuntimeError("boom")


class Colliding:
    @hookimpl
    def register_matchers(self, register):
        register("nearest", object)


class BadName:
    @hookimpl
    def register_matchers(self, register):
        register("Bad Name", object)


class Good:
    @hookimpl
    def register_matchers(self, register):
        register("good", object)


def test_builtins_are_registered_through_hooks():
    pm = PluginManager(entry_points=False)
    assert {"stable-diffusion", "dino", "dinov2", "openclip"} <= set(pm.names("extractor"))
    assert {"spair", "pfwillow", "cub"} <= set(pm.names("dataset"))
    assert pm.names("aggregator") == ["concat", "fuse", "hyperfeatures", "mean", "select"]
    assert pm.names("matcher") == ["mutual", "nearest", "soft-argmax"]
    assert pm.get("matcher", "nearest").plugin == "matchers"


def test_broken_plugins_are_isolated():
    pm = PluginManager(entry_points=False)
    records = {
        name: pm.add_plugin(obj, name)
        for name, obj in [
            ("misspelled", Misspelled()),
            ("raising", Raising()),
            ("colliding", Colliding()),
            ("badname", BadName()),
            ("good", Good()),
        ]
    }
    assert "unknown hook 'register_extractor'" in records["misspelled"].error
    assert "did you mean 'register_extractors'" in records["misspelled"].error
    assert "RuntimeError: boom" in records["raising"].error
    assert "already provided by plugin 'matchers'" in records["colliding"].error
    assert "invalid matcher name 'Bad Name'" in records["badname"].error
    assert records["good"].ok and records["good"].provides == ["matcher:good"]
    assert pm.get("matcher", "nearest").plugin == "matchers"  # the collision did not replace it
    assert "never" not in pm.names("extractor")


def test_import_failure_is_recorded(monkeypatch):
    pm = PluginManager(entry_points=False, builtins=False)

    def boom():
        raise ImportError("no module named 'missingdep'")

    pm._load("fragile", "1.0", "entry point (fragile)", boom)
    rec = pm.records["fragile"]
    assert not rec.ok and "missingdep" in rec.error


def test_disable_env(monkeypatch):
    monkeypatch.setenv("DIFFEAT_DISABLE_PLUGINS", "matchers")
    pm = PluginManager(entry_points=False)
    assert pm.names("matcher") == []
    assert pm.names("aggregator") == ["concat", "fuse", "hyperfeatures", "mean", "select"]
