"""Throwaway PKI for transfer tests, made at test time with the openssl CLI (nothing committed).

`make_pki(dir)` writes a CA, a server cert for localhost/127.0.0.1 and a client cert signed by
it, plus a second, unrelated CA with its own client cert (the "wrong certificate" sender).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str) -> None:
    (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n"
                                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def make_pki(d: Path) -> dict[str, str]:
    """Paths of: ca, server_cert/key, client_cert/key (signed by ca), rogue_ca, rogue_cert/key."""
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _leaf(d, "server", "ca")
    _leaf(d, "client", "ca")
    _ca(d, "rogue_ca")
    _leaf(d, "rogue", "rogue_ca")
    p = lambda n: str(d / n)  # noqa: E731
    return {"ca": p("ca.pem"), "server_cert": p("server.pem"), "server_key": p("server.key"),
            "client_cert": p("client.pem"), "client_key": p("client.key"),
            "rogue_ca": p("rogue_ca.pem"), "rogue_cert": p("rogue.pem"), "rogue_key": p("rogue.key")}
