"""Row 23, `parscale demo --port N` on a busy port: refused before the models load (they take
minutes), one line naming the port and the fix."""
import socket

import pytest

from parscale_edge.cli import main


def test_a_busy_port_is_refused_before_loading(monkeypatch, capsys):
    pytest.importorskip("gradio")
    import parscale_edge.demo.models

    monkeypatch.setattr(parscale_edge.demo.models, "load_pair", lambda *a, **k: pytest.fail("loaded the models first"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        capsys.readouterr()
        assert main(["demo", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port}") and "choose another --port" in err
    assert err.count("\n") == 1


def test_an_unknown_host_is_refused(capsys):
    capsys.readouterr()
    assert main(["demo", "--host", "no-such-host.invalid", "--port", "7999"]) == 2
    assert "--host no-such-host.invalid: cannot resolve it" in capsys.readouterr().err
