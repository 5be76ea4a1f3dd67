"""Config loading: targets from YAML, env and flags; one-line errors; secrets never shown."""

import pytest
from click.testing import CliRunner

from opskit.core import config
from opskit.core.config import ConfigError, Secret


def write(tmp_path, text):
    p = tmp_path / "opskit.yaml"
    p.write_text(text)
    return p


def test_full_config(tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-file-secret\n")
    p = write(tmp_path, f"""
targets:
  - name: deepseek
    base_url: https://api.deepseek.com/
    kind: hosted
    models: [deepseek-chat, deepseek-reasoner]
    daily_quota_requests: 1000
    auth: {{scheme: bearer, api_key_file: {keyfile}}}
  - name: cluster
    base_url: http://vllm.svc:8000/v1
    auth: {{scheme: hmac, api_key_env: KID, secret_key_env: SEC}}
  - name: sso
    base_url: http://127.0.0.1:1/v1
    auth: {{scheme: oauth2, token_url: http://127.0.0.1:1/oauth/token, client_id: app, client_secret_env: CS}}
probe: {{interval_s: 30, max_tokens: 4}}
""")
    cfg = config.load(p, env={"KID": "kid", "SEC": "s3cret", "CS": "cs"})
    ds, cl, sso = cfg.targets
    assert ds.base_url == "https://api.deepseek.com" and ds.kind == "hosted"
    assert ds.auth.api_key.reveal() == "sk-file-secret"
    assert ds.daily_quota_requests == 1000
    assert cl.kind == "private" and cl.auth.secret_key.reveal() == "s3cret"
    assert sso.auth.client_secret.reveal() == "cs" and sso.auth.client_id == "app"
    assert cfg.probe.interval_s == 30 and cfg.probe.max_tokens == 4
    assert cfg.target("cluster") is cl


@pytest.mark.parametrize("text,key,expected", [
    ("targets: {}", "targets", "a list"),
    ("targets: [{name: a}]", "targets[0].base_url", "http"),
    ("targets: [{name: a, base_url: ftp://x}]", "targets[0].base_url", "http"),
    ("targets: [{name: a, base_url: 'http://x', kind: cloud}]", "targets[0].kind", "hosted | private"),
    ("targets: [{name: a, base_url: 'http://x', auth: {scheme: bearer, api_key: sk-inline}}]",
     "targets[0].auth.api_key", "api_key_env or api_key_file"),
    ("targets: [{name: a, base_url: 'http://x', auth: {scheme: bearer, api_key_env: NOPE}}]",
     "targets[0].auth.api_key_env", "$NOPE to be set"),
    ("targets: [{name: a, base_url: 'http://x'}, {name: a, base_url: 'http://y'}]", "targets", "unique"),
    ("probe: {interval_s: -1}", "probe.interval_s", "positive"),
    ("probe: {interval_s: .inf}", "probe.interval_s", "positive"),  # would never probe
    ("probe: {timeout_s: .nan}", "probe.timeout_s", "positive"),
    ("targets: [{name: a, base_url: 'http://x', timeout_s: .inf}]", "targets[0].timeout_s", "positive"),
    ("bogus: 1", "bogus", "only targets"),
    # a misspelt key would otherwise leave its setting at the default without a word
    ("targets: [{name: a, base_url: 'http://x', daily_quota: 5}]", "targets[0].daily_quota", "daily_quota_requests"),
    ("targets: [{name: a, base_url: 'http://x', auth: {scheme: bearer, api_key_evn: K}}]",
     "targets[0].auth.api_key_evn", "api_key_env, api_key_file"),
    ("probe: {interval: 5}", "probe.interval", "one of interval_s, prompt"),
    ("targets: [\n  - name: [", "line", "valid YAML"),
    # urllib finds these only when the URL is used: a traceback far from the config
    ("targets: [{name: a, base_url: 'http://127.0.0.1:99999'}]", "targets[0].base_url", "Port out of range"),
    ("targets: [{name: a, base_url: 'http://h:port'}]", "targets[0].base_url", "valid host and port"),
    ("targets: [{name: a, base_url: 'http://[::1:8000/v1'}]", "targets[0].base_url", "Invalid IPv6 URL"),
    ("targets: [{name: a, base_url: 'http://x', auth: {scheme: oauth2, token_url: 'http://[::1/t', client_id: c}}]", "targets[0].auth.token_url", "Invalid IPv6 URL"),
    # a bool is never a number here: `true` exported a quota of 1
    ("targets: [{name: a, base_url: 'http://x', daily_quota_requests: true}]", "targets[0].daily_quota_requests",
     "a positive integer"),
    ("probe: {max_tokens: true}", "probe.max_tokens", "a positive integer"),
    ("1: 2", "1", "only targets"),
])
def test_bad_config_names_file_key_and_expectation(tmp_path, text, key, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(p, env={})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"config error: {p}: ")
    assert key in msg and expected in msg


def test_inline_secret_is_refused_without_echoing_it(tmp_path):
    p = write(tmp_path, "targets: [{name: a, base_url: 'http://x', auth: {scheme: bearer, api_key: sk-LEAK}}]")
    with pytest.raises(ConfigError) as err:
        config.load(p, env={})
    assert "sk-LEAK" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a readable file"):
        config.load(tmp_path / "nope.yaml")


def test_binary_config_and_key_files_are_one_line(tmp_path):
    p = tmp_path / "garbage.yaml"
    p.write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    with pytest.raises(ConfigError) as err:
        config.load(p, env={})
    assert str(err.value) == f"config error: {p}: expected a UTF-8 YAML text file (byte 0 is not UTF-8)"
    key = tmp_path / "key.bin"
    key.write_bytes(b"\x80\x81")
    with pytest.raises(ConfigError, match=r"targets\[0\].auth.api_key_file: expected a UTF-8 text file"):
        config.load(write(tmp_path, f"targets: [{{name: a, base_url: 'http://x', auth: {{api_key_file: {key}}}}}]"),
                    env={})
    with pytest.raises(ConfigError, match="expected a UTF-8 text key file"):
        config.load(target_url="http://127.0.0.1:1", env={"OPSKIT_API_KEY_FILE": str(key)})


def test_target_from_env_and_flag(tmp_path):
    cfg = config.load(env={"OPSKIT_TARGET_URL": "http://127.0.0.1:8000/v1", "OPSKIT_API_KEY": "sk-env"})
    t = cfg.target()
    assert t.name == "default" and t.kind == "private" and t.auth.scheme == "bearer"
    assert t.auth.api_key.reveal() == "sk-env"
    cfg = config.load(target_url="https://api.example.test", env={})
    assert cfg.target().kind == "hosted" and cfg.target().auth.scheme == "none"


def test_target_from_flag_errors_name_the_flag_and_the_key_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config.load(target_url="notaurl", env={})
    assert str(exc.value) == "config error: --target: expected an http:// or https:// URL"
    with pytest.raises(ConfigError) as exc:
        config.load(env={"OPSKIT_TARGET_URL": "http://127.0.0.1:99999"})
    assert str(exc.value) == ("config error: $OPSKIT_TARGET_URL: expected an http:// or https:// URL with a valid "
                              "host and port (Port out of range 0-65535)")
    missing = tmp_path / "no-key"
    with pytest.raises(ConfigError) as exc:
        config.load(target_url="https://api.example.test", env={"OPSKIT_API_KEY_FILE": str(missing)})
    assert str(exc.value) == ("config error: $OPSKIT_API_KEY_FILE: expected a readable key file "
                              f"({missing}: No such file or directory)")
    missing.write_text("sk-from-file\n")
    cfg = config.load(target_url="https://api.example.test", env={"OPSKIT_API_KEY_FILE": str(missing)})
    assert cfg.target().auth.api_key.reveal() == "sk-from-file"


def test_no_target_is_a_config_error():
    with pytest.raises(ConfigError, match="at least one target"):
        config.load(env={}).target()


def test_secret_never_shows_itself():
    s = Secret("sk-very-secret")
    assert "sk-very" not in repr(s) and "sk-very" not in str(s) and "sk-very" not in f"{s}"
    t = config.AuthConfig(scheme="bearer", api_key=s)
    assert "sk-very" not in repr(t)


def test_cli_version_and_help():
    from opskit import __version__
    from opskit.cli import main

    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "Examples" in r.output
    r = CliRunner().invoke(main, ["no-such-command"])
    assert r.exit_code == 2


def test_config_error_in_any_command_is_one_line_exit_2(tmp_path, monkeypatch):
    import click

    from opskit import cli

    @click.command()
    def boom():
        config.load(tmp_path / "missing.yaml")

    monkeypatch.setitem(cli.COMMANDS, "boom", f"{__name__}:_boom")
    monkeypatch.setitem(globals(), "_boom", boom)
    r = CliRunner().invoke(cli.main, ["boom"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "config error" in r.output and "missing.yaml" in r.output


def test_the_shipped_example_config_parses():
    from pathlib import Path

    from opskit.core import config

    example = Path(__file__).resolve().parent.parent / "examples" / "opskit.yaml"
    cfg = config.parse(__import__("yaml").safe_load(example.read_text()), str(example),
                       {"DEEPSEEK_API_KEY": "sk-example"})
    assert [(t.name, t.kind, t.auth.scheme) for t in cfg.targets] == [("deepseek", "hosted", "bearer"),
                                                                     ("llm-server", "private", "none")]
    assert cfg.probe.interval_s == 60
