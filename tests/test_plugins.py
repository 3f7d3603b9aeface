from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from diffeat.cli.api import DiffeatError, command_group, emit_json, is_quiet
from diffeat.core.hookspecs import hookimpl
from diffeat.core.plugins import PluginManager, call_hookimpl
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
    assert pm.names("matcher") == ["cross-attention", "mutual", "nearest", "soft-argmax"]
    assert pm.get("matcher", "nearest").plugin == "matchers"
    assert pm.get("aggregator", "fuse").plugin == "fuse"
    assert pm.get("aggregator", "hyperfeatures").plugin == "hyperfeatures"
    assert pm.get("aggregator", "concat").plugin == "aggregators"
    for name in ("fuse", "hyperfeatures"):
        assert pm.records[name].ok and pm.records[name].origin == "builtin"


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
    assert pm.names("matcher") == ["cross-attention"]  # a plugin of its own
    monkeypatch.setenv("DIFFEAT_DISABLE_PLUGINS", "matchers,cross-attention")
    pm = PluginManager(entry_points=False)
    assert pm.names("matcher") == []
    assert pm.names("aggregator") == ["concat", "fuse", "hyperfeatures", "mean", "select"]


@pytest.mark.parametrize("disabled", ["fuse", "hyperfeatures"])
def test_fuse_and_hyperfeatures_are_disabled_separately(monkeypatch, disabled):
    monkeypatch.setenv("DIFFEAT_DISABLE_PLUGINS", disabled)
    pm = PluginManager(entry_points=False)
    kept = {"fuse", "hyperfeatures"} - {disabled}
    assert pm.names("aggregator") == sorted(["concat", "mean", "select", *kept])
    assert disabled not in pm.records and kept <= set(pm.records)


# -- register_commands ---------------------------------------------------------


@click.group()
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def _root(ctx: click.Context, quiet: bool) -> None:
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet


def fresh_cli() -> click.Group:
    """A root group like ``diffeat``'s, without any command."""
    return click.Group("diffeat", callback=_root.callback, params=list(_root.params))


class Hello:
    @hookimpl
    def register_commands(self, cli):
        @click.command("hello")
        @click.option("--json", "as_json", is_flag=True)
        @click.pass_context
        def hello(ctx, as_json):
            if as_json:
                emit_json({"hello": "world"})
            elif not is_quiet(ctx):
                click.echo("hello world")

        @click.command("hello-plot")
        def hello_plot():
            raise DiffeatError("nothing to plot")

        cli.add_command(hello)
        command_group(cli, "plot", "Plot what a trained component learned.").add_command(hello_plot)


class CommandsRaising:
    @hookimpl
    def register_commands(self, cli):
        raise RuntimeError("no commands today")


class CommandClash:
    @hookimpl
    def register_commands(self, cli):
        command_group(cli, "hello", "not a group")


def test_builtin_plugins_bring_their_commands():
    pm = PluginManager(entry_points=False)
    cli = fresh_cli()
    pm.add_commands(cli)
    assert {"generate", "checkpoint", "plot"} <= set(cli.commands)
    assert set(cli.commands["checkpoint"].commands) == {"info", "import-official"}
    assert set(cli.commands["plot"].commands) == {"mixing-weights", "attention"}
    assert "command:generate" in pm.records["stable-diffusion"].provides
    assert "command:plot attention" in pm.records["cross-attention"].provides
    assert "command:plot mixing-weights" in pm.records["hyperfeatures"].provides


def test_disabled_plugin_brings_no_commands(monkeypatch):
    monkeypatch.setenv("DIFFEAT_DISABLE_PLUGINS", "hyperfeatures,stable-diffusion,cross-attention")
    cli = fresh_cli()
    PluginManager(entry_points=False).add_commands(cli)
    assert not {"generate", "checkpoint", "plot"} & set(cli.commands)


def test_plugin_commands_share_groups_and_failures_are_isolated():
    pm = PluginManager(entry_points=False)
    records = {
        name: pm.add_plugin(obj, name)
        for name, obj in [("hello", Hello()), ("raising", CommandsRaising())]
    }
    cli = fresh_cli()
    pm.add_commands(cli)
    assert "RuntimeError: no commands today" in records["raising"].error
    assert records["hello"].provides == ["command:hello", "command:plot hello-plot"]
    # the hyperfeatures plugin and this one add to the same `plot` group
    assert set(cli.commands["plot"].commands) == {"mixing-weights", "attention", "hello-plot"}
    runner = CliRunner()
    assert runner.invoke(cli, ["hello"], obj={}).output == "hello world\n"
    assert runner.invoke(cli, ["-q", "hello"], obj={}).output == ""
    assert runner.invoke(cli, ["hello", "--json"], obj={}).output == '{\n  "hello": "world"\n}\n'
    result = runner.invoke(cli, ["plot", "hello-plot"], obj={})
    assert isinstance(result.exception, DiffeatError)
    # a plugin asking for a group where another plugin put a command is recorded as broken
    later = PluginManager(entry_points=False, builtins=False)
    later.add_plugin(CommandClash(), "clash")
    later.add_commands(cli)
    assert "`diffeat hello` is a command, not a group" in later.records["clash"].error


# -- hook implementations are called by the argument names they declare ---------


class FewerArguments:
    """Implementations that declare fewer arguments than their specification (pluggy allows it)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def register_matchers(self):
        self.calls.append("register_matchers")

    @hookimpl
    def register_commands(self):
        self.calls.append("register_commands")


def test_hookimpls_may_declare_fewer_arguments_than_the_spec():
    pm = PluginManager(entry_points=False, builtins=False)
    plugin = FewerArguments()
    record = pm.add_plugin(plugin, "fewer")
    pm.add_commands(fresh_cli())
    assert record.ok, record.error
    assert plugin.calls == ["register_matchers", "register_commands"]


def test_a_hook_can_gain_an_argument_without_breaking_old_plugins():
    pm = PluginManager(entry_points=False, builtins=False)
    pm.add_plugin(Good(), "good")
    (impl,) = pm._pm.hook.register_matchers.get_hookimpls()
    seen = []
    # a later diffeat may offer more arguments: the old implementation gets the ones it declares
    call_hookimpl(impl, {"register": lambda *a: seen.append(a), "context": object()})
    assert seen == [("good", object)]


def test_implementation_asking_for_an_unknown_argument_is_rejected():
    class Unknown:
        @hookimpl
        def register_matchers(self, register, context):
            register("never", object)

    pm = PluginManager(entry_points=False, builtins=False)
    record = pm.add_plugin(Unknown(), "unknown")
    assert "invalid hook implementation" in record.error and "context" in record.error
    assert pm.names("matcher") == []


# -- a plugin never replaces a command or component that is already there ------


class ReplacesExtract:
    @hookimpl
    def register_commands(self, cli):
        @click.command("extract")
        def fake_extract():
            click.echo("not the real extract")

        @click.command("new-one")
        def new_one():
            click.echo("new")

        cli.add_command(new_one)
        cli.add_command(fake_extract)


class ReplacesAPluginSubcommand:
    @hookimpl
    def register_commands(self, cli):
        cli.commands["plot"].add_command(click.Command("mixing-weights"))
        cli.commands["plot"].add_command(click.Command("extra"))


class ReplacesAGroup:
    @hookimpl
    def register_commands(self, cli):
        cli.add_command(click.Command("checkpoint"))


class RemovesACommand:
    @hookimpl
    def register_commands(self, cli):
        del cli.commands["extract"]


def _cli_with_builtin_extract() -> tuple[click.Group, click.Command]:
    cli = fresh_cli()

    @click.command("extract")
    def extract():
        click.echo("the real extract")

    cli.add_command(extract)
    return cli, extract


@pytest.mark.parametrize(
    "plugin, path, owner",
    [
        (ReplacesExtract(), "extract", "diffeat (a built-in command)"),
        (ReplacesAPluginSubcommand(), "plot mixing-weights", "plugin 'hyperfeatures'"),
        (ReplacesAGroup(), "checkpoint", "plugin 'hyperfeatures'"),
        (RemovesACommand(), "extract", "diffeat (a built-in command)"),
    ],
    ids=["builtin", "plugin-subcommand", "plugin-group", "removal"],
)
def test_a_command_under_a_taken_name_is_refused_naming_both(plugin, path, owner):
    pm = PluginManager(entry_points=False)
    record = pm.add_plugin(plugin, "intruder")
    assert record.ok
    cli, extract = _cli_with_builtin_extract()
    before = {name: cmd for name, cmd in cli.commands.items()}
    pm.add_commands(cli)
    assert not record.ok
    assert f"plugin 'intruder' replaces the command `diffeat {path}`" in record.error
    assert f"which {owner} provides" in record.error and "DIFFEAT_DISABLE_PLUGINS" in record.error
    assert not any(p.startswith("command:") for p in record.provides)
    # everything is as the built-ins and the well-behaved plugins left it
    assert cli.commands["extract"] is extract and before["extract"] is extract
    assert "new-one" not in cli.commands
    assert set(cli.commands["checkpoint"].commands) == {"info", "import-official"}
    assert set(cli.commands["plot"].commands) == {"mixing-weights", "attention"}
    assert pm.records["hyperfeatures"].ok and "command:plot mixing-weights" in (
        pm.records["hyperfeatures"].provides
    )
    assert CliRunner().invoke(cli, ["extract"], obj={}).output == "the real extract\n"


def test_a_raising_command_hook_leaves_no_half_of_its_commands():
    class HalfThenRaise:
        @hookimpl
        def register_commands(self, cli):
            cli.add_command(click.Command("half"))
            raise RuntimeError("second command failed")

    pm = PluginManager(entry_points=False, builtins=False)
    record = pm.add_plugin(HalfThenRaise(), "half")
    cli = fresh_cli()
    pm.add_commands(cli)
    assert "second command failed" in record.error and "half" not in cli.commands


@pytest.mark.parametrize(
    "kind, name, owner",
    [
        ("extractor", "stable-diffusion", "stable-diffusion"),
        ("dataset", "spair", "datasets"),
        ("aggregator", "fuse", "fuse"),
    ],
)
def test_a_component_under_a_taken_name_is_refused_naming_both(kind, name, owner):
    class Intruder:
        pass

    def register(self, register):
        register(name, ColorBlurExtractor)
        register("intruder-own", ColorBlurExtractor)

    setattr(Intruder, f"register_{kind}s", hookimpl(register))
    pm = PluginManager(entry_points=False)
    original = pm.get(kind, name)
    record = pm.add_plugin(Intruder(), "intruder")
    assert f"plugin 'intruder' registers {kind} {name!r}" in record.error
    assert f"already provided by plugin {owner!r}" in record.error
    assert pm.get(kind, name) is original and original.plugin == owner
    assert "intruder-own" not in pm.names(kind) and record.provides == []
