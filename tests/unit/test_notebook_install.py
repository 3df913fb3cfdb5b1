"""install.ensure_requirements: installs only what is missing, never touches torch, reports outside Colab."""

from __future__ import annotations

import sys

import pytest

from nbkit.notebook import install


@pytest.fixture
def pins(tmp_path, monkeypatch):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ntorch==9.9.9\ntransformers==5.24.0\nnumpy==2.4.6\nhttpx==0.28.1\n"
                   "pyngrok==9.1.0 ; python_version>'3'\nnot-a-pin>=1\n")
    versions = {"torch": "2.8.0+cu126", "transformers": "4.57.1", "numpy": "2.0.2", "httpx": "0.27.0",
                "pyngrok": None}
    monkeypatch.setattr(install, "installed_version", lambda name: versions.get(name))
    calls = []
    monkeypatch.setattr(install.subprocess, "run", lambda cmd, check: calls.append(cmd))
    return req, calls, versions


def test_only_missing_or_incompatible_pins(pins):
    req, _, _ = pins
    assert install.read_pins(req) == [("torch", "9.9.9"), ("transformers", "5.24.0"), ("numpy", "2.4.6"),
                                      ("httpx", "0.28.1"), ("pyngrok", "9.1.0")]
    # torch never; transformers must match exactly; Colab's numpy 2.0 and httpx 0.x are kept (same major).
    assert install.missing(install.read_pins(req)) == ["transformers==5.24.0", "pyngrok==9.1.0"]


def test_colab_installs_with_torch_pinned_to_what_is_there(pins, monkeypatch):
    req, calls, _ = pins
    seen_constraints = []
    real_run = calls.append

    def run(cmd, check):
        with open(cmd[cmd.index("-c") + 1]) as f:
            seen_constraints.append(f.read())
        real_run(cmd)

    monkeypatch.setattr(install.subprocess, "run", run)
    monkeypatch.setattr(install, "loaded", lambda reqs: [])
    done = install.ensure_requirements(req, install=True, embedded_model=True)
    assert done == ["transformers==5.24.0", "pyngrok==9.1.0", install.EMBEDDED_MODEL]
    assert calls[0][-2:] == ["transformers==5.24.0", "pyngrok==9.1.0"]
    assert "--no-deps" in calls[1] and calls[1][-1] == install.EMBEDDED_MODEL
    assert all(not any(a.startswith("torch") for a in cmd) for cmd in calls)
    assert seen_constraints == ["torch==2.8.0+cu126\n"] * 2


def test_outside_colab_it_only_reports(pins, capsys):
    req, calls, _ = pins
    assert install.ensure_requirements(req) == ["transformers==5.24.0", "pyngrok==9.1.0"]
    assert calls == [] and "not installing outside Colab" in capsys.readouterr().out


def test_replacing_an_imported_package_asks_for_a_restart(pins, monkeypatch):
    req, calls, _ = pins
    monkeypatch.setitem(sys.modules, "transformers", sys.modules.get("transformers") or object())
    monkeypatch.setattr(install, "_import_names", lambda dist: {dist})
    with pytest.raises(install.RestartRequired, match="transformers.*Restart session"):
        install.ensure_requirements(req, install=True)
    assert calls  # installed first, then asked for the restart


def test_the_real_requirements_are_satisfied_here():
    # The venv of `make setup` holds every pin, so a notebook run here installs nothing.
    assert install.missing(install.read_pins()) == []
