# -*- test-case-name: tests.test_doctor_proxy -*-
"""
A private Debian C{nginx} in front of real servers, for the setups HAProxy
cannot show: nginx buffers proxied responses (C{proxy_buffering on}, its
default, with the HTTP/1.0 upstream protocol it uses by default), which
holds back an event stream unless the server says C{X-Accel-Buffering: no}
and nginx listens to it.

The same rules as L{tests.haproxy}: its own config and temporary
directories, one foreground process (C{daemon off; master_process off})
under the parent-death guard, stopped at cleanup, log kept.  nginx cannot
take an inherited listening socket in a supported way, so its port is
picked free just before it starts (the small race C{tests.e2e.freePort}
accepts too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from twisted.trial.unittest import TestCase

from tests.e2e import freePort
from tests.haproxy import Backend, RunningProxy, _backends, requireProgram, spawnProxy, waitForProxy

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")

#: The path nginx answers itself to say it is up.
READY_PATH = "/__nginx_ready"


def requireNginx() -> str:
    """
    The nginx program (see L{tests.haproxy.requireProgram}).
    """
    return requireProgram(NGINX_CANDIDATES, "bash scripts/setup-nginx.sh")


def nginxConfig(
    directory: str,
    port: int,
    backends: Sequence[Backend],
    *,
    tls: Optional[str] = None,
    buffering: bool = False,
    ignoreAccelBuffering: bool = False,
    readTimeout: float = 3600.0,
) -> str:
    """
    The configuration L{startNginx} runs: see its parameters.
    """
    upstream = "\n".join(f"        server {host}:{p};" for host, p in _backends(backends))
    listen = f"listen 127.0.0.1:{port}" + (" ssl" if tls else "") + ";"
    certificate = f"        ssl_certificate {tls};\n        ssl_certificate_key {tls};\n" if tls else ""
    proxying = [
        "proxy_pass http://app;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        f"proxy_read_timeout {max(1, int(readTimeout))}s;",
        f"proxy_buffering {'on' if buffering else 'off'};",
    ]
    if buffering:
        # nginx's default upstream protocol, under which it holds a
        # streamed body in its buffers.
        proxying.append("proxy_http_version 1.0;")
    else:
        proxying.append("proxy_http_version 1.1;")
    if ignoreAccelBuffering:
        proxying.append("proxy_ignore_headers X-Accel-Buffering;")
    inner = "\n".join(f"            {line}" for line in proxying)
    return (
        "daemon off;\n"
        "master_process off;\n"
        "worker_processes 1;\n"
        f"pid {directory}/nginx.pid;\n"
        "error_log stderr notice;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    access_log /dev/stderr;\n"
        f"    client_body_temp_path {directory}/body;\n"
        f"    proxy_temp_path {directory}/proxy;\n"
        f"    fastcgi_temp_path {directory}/fastcgi;\n"
        f"    uwsgi_temp_path {directory}/uwsgi;\n"
        f"    scgi_temp_path {directory}/scgi;\n"
        f"    upstream app {{\n{upstream}\n    }}\n"
        "    server {\n"
        f"        {listen}\n"
        f"{certificate}"
        f'        location = {READY_PATH} {{ return 200 "ready"; }}\n'
        f"        location / {{\n{inner}\n        }}\n"
        "    }\n"
        "}\n"
    )


async def startNginx(
    testCase: TestCase,
    reactor: Any,
    backends: Sequence[Backend],
    *,
    port: Optional[int] = None,
    tls: Optional[str] = None,
    caFile: Optional[str] = None,
    buffering: bool = False,
    ignoreAccelBuffering: bool = False,
    readTimeout: float = 3600.0,
    timeout: float = 15.0,
) -> RunningProxy:
    """
    Start nginx in front of C{backends} (round-robin, nginx's default) and
    wait until it answers.

    @param port: the public port (pick it with C{tests.e2e.freePort} first
        when the servers' C{--issuer} must name it).
    @param tls: a PEM with certificate and key (L{tests.haproxy.TestCA}).
    @param buffering: C{proxy_buffering on} (with HTTP/1.0 upstream, as
        nginx does by default): a streamed response is held back unless
        the server sends C{X-Accel-Buffering: no}...
    @param ignoreAccelBuffering: ...and nginx listens to it; with this,
        it does not (C{proxy_ignore_headers X-Accel-Buffering}).
    @param readTimeout: C{proxy_read_timeout}, seconds.
    """
    program = requireNginx()
    if tls is not None and caFile is None:
        raise ValueError("tls needs the caFile clients should trust")
    directory = os.path.abspath(testCase.mktemp())
    os.makedirs(directory)
    if port is None:
        port = freePort()
    configFile = os.path.join(directory, "nginx.conf")
    with open(configFile, "w") as f:
        f.write(
            nginxConfig(
                directory,
                port,
                backends,
                tls=tls,
                buffering=buffering,
                ignoreAccelBuffering=ignoreAccelBuffering,
                readTimeout=readTimeout,
            )
        )
    argv = [program, "-c", configFile, "-p", directory]
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    proxy = spawnProxy(testCase, reactor, "nginx", argv, configFile, url, port, caFile)
    await waitForProxy(reactor, proxy, READY_PATH, timeout=timeout)
    return proxy
