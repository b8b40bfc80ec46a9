"""
The house drawn from imports: which package of L{smeldr_oauth} may import
which, read from the source (every C{import}, at module level or inside a
function, C{TYPE_CHECKING} ones included), so that no arrow runs back up
unnoticed.  C{docs/architecture.md} draws the same house.

The rules are an allow-list: a package that starts importing another one
must be given the right here, in one line a reviewer sees.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from typing import Optional

import attr
from twisted.trial.unittest import SynchronousTestCase

#: The checkout: the source is read, not imported.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(CHECKOUT, "smeldr_oauth")
PACKAGE = "smeldr_oauth"

_OAUTH = "smeldr_oauth.oauth"
_DB = "smeldr_oauth.db"
_DB_ERRORS = "smeldr_oauth.db.errors"
_MCP = "smeldr_oauth.mcp"
_MCP_HTTP = "smeldr_oauth.mcp.http"
_MCP_STDIO = "smeldr_oauth.mcp.stdio"
_MCP_STATE_PG = "smeldr_oauth.mcp.state.postgres"
_STORE = "smeldr_oauth.store"
_WEB = "smeldr_oauth.web"
_DOCTOR = "smeldr_oauth.doctor"
_GATEWAY = "smeldr_oauth.gateway"
_SITE = "smeldr_oauth.site"
_SITE_ADMIN = "smeldr_oauth.site.admin"
_SERVICE = "smeldr_oauth.service"
_FLOWS = "smeldr_oauth.flows"

#: Every layer (a package, or a module with a rule of its own) and the
#: layers it may import, bottom up.  A module belongs to the longest name
#: here that contains it; sub-packages not named (C{oauth.cimd},
#: C{mcp.state}) belong to their parent.  C{None}: anything (the wiring).
LAYERS: dict[str, Optional[frozenset[str]]] = {
    # The OAuth 2.1 authorization server's protocol core: records, rules,
    # the services, the interfaces its store implements.
    _OAUTH: frozenset(),
    # The database layer (adbapi, an engine per database, migrations).
    _DB: frozenset({_DB_ERRORS}),
    # The database's typed errors (unavailable, conflict): the vocabulary
    # with which the edges answer 503 with Retry-After, so theirs to name.
    _DB_ERRORS: frozenset(),
    # The MCP protocol core and its session-state seams: transport-free.
    # It reads the resource server's verdicts (oauth's IAccessVerifier).
    _MCP: frozenset({_OAUTH, _DB_ERRORS}),
    # The smeldr-oauth-stdio command (a process's main): its --database is
    # a PostgreSQL URL by db's rule, as every command's is.
    _MCP_STDIO: frozenset({_MCP, _OAUTH, _DB, _DB_ERRORS}),
    # The OAuth store implementations (memory, SQL): oauth's IOAuthStore
    # over db.
    _STORE: frozenset({_OAUTH, _DB, _DB_ERRORS}),
    # The session-state seams shared by processes: mcp's interfaces over
    # db (tables, LISTEN/NOTIFY routing between processes).
    _MCP_STATE_PG: frozenset({_MCP, _OAUTH, _DB, _DB_ERRORS}),
    # The HTTP edge of the authorization server (Klein).
    _WEB: frozenset({_OAUTH, _DB_ERRORS}),
    # The MCP transports over HTTP, on the web edge's helpers.
    _MCP_HTTP: frozenset({_MCP, _OAUTH, _WEB, _DB_ERRORS}),
    # The deployment checker: an outside client, with oauth's URL rules.
    _DOCTOR: frozenset({_OAUTH}),
    # The gateway to upstream MCP servers: an MCP client and server.
    # Its front maps each upstream to a protected resource (oauth's rules).
    _GATEWAY: frozenset({_MCP, _OAUTH}),
    # The default site's content: posts, tokens, the MCP tools.
    _SITE: frozenset({_DB, _MCP, _OAUTH, _DB_ERRORS}),
    # The flow timeline: steps from the log events, in db; the operator's
    # page on the web edge's sign-in (issue 14).
    _FLOWS: frozenset({_OAUTH, _DB, _WEB, _DB_ERRORS}),
    # The admin command: opens the stores, runs the doctor, reads the
    # flow timeline.
    _SITE_ADMIN: frozenset({_SITE, _DB, _MCP, _OAUTH, _STORE, _DOCTOR, _FLOWS, _DB_ERRORS}),
    # The wiring (twist plugin, workers, metrics): ties everything together.
    _SERVICE: None,
    # The package itself: the Python API re-exports from the layers.
    PACKAGE: None,
}

#: The server side of HTTP, which the protocol cores and the stores leave
#: to C{web/}, C{mcp/http/} and C{service/}.  (Outbound fetches, with
#: C{twisted.web.client} and treq, are the OAuth core's own: client
#: metadata documents, behind the vetted-address agent.)
SERVER_HTTP = (
    "klein",
    "werkzeug.routing",
    "twisted.web.server",
    "twisted.web.resource",
    "twisted.web.static",
    "twisted.web.template",
    "twisted.web.util",
    "twisted.web.wsgi",
)

#: The layers that never import L{SERVER_HTTP}.
NO_SERVER_HTTP = (_OAUTH, _MCP, _MCP_STATE_PG, _DB, _STORE, _SITE)

#: Who may import the global reactor (everyone else is given one): the
#: wiring, and entry points that are a process's C{main}.
REACTOR_IMPORTERS = {
    _SERVICE: "the wiring",
    _MCP_STDIO: "main(), the smeldr-oauth-stdio command",
    # Known, left to the database layer's owner: Database(reactor=None)
    # falls back to the global reactor.
    "smeldr_oauth.db.database": "the default of Database(reactor=None)",
}


#: A module a reader can hold in their head: at most this many lines.
MAX_LINES = 500

#: The modules over L{MAX_LINES} today, each left to the engineer whose
#: area it is (issue 10: cut by concern, or say in the docstring why it is
#: one).  A module not listed here fails when it grows past the limit.
OVERSIZE = {
    "smeldr_oauth.gateway.configfile": "validating the gateway's options and TOML file, one function a key (cleanup3)",
    "smeldr_oauth.gateway.http": "one HTTP channel: both transports drive one state machine (gateway2, cleanup3)",
    "smeldr_oauth.gateway.proxy": "one downstream session's method table (gateway2, cleanup3)",
    "smeldr_oauth.gateway.link": "one upstream instance: lifecycle and routing share its state (gateway2, cleanup3)",
    "smeldr_oauth.db.database": "Database and its group commit share one connection path (perf, cleanup3)",
    "smeldr_oauth.db.notify": "LISTEN/NOTIFY (perf)",
    "smeldr_oauth.mcp.http.registry": "the session registry and its cross-process copies (scale)",
}


@attr.s(frozen=True, auto_attribs=True)
class Import:
    """
    One imported name, where it is imported.
    """

    module: str
    path: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{os.path.relpath(self.path, CHECKOUT)}:{self.line} imports {self.target}"


def modules(root: str = ROOT, package: str = PACKAGE) -> Iterator[tuple[str, str, bool]]:
    """
    (module name, file path, is a package's C{__init__}) for every module
    under C{root}.
    """
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith((".", "__")))
        relative = os.path.relpath(directory, root)
        prefix = package if relative == "." else package + "." + relative.replace(os.sep, ".")
        for name in sorted(files):
            if name.endswith(".py"):
                init = name == "__init__.py"
                yield (prefix if init else f"{prefix}.{name[:-3]}"), os.path.join(directory, name), init


def imports_of(module: str, path: str, is_package: bool, source: Optional[str] = None) -> Iterator[Import]:
    """
    Every name C{path} imports, absolute: C{from a import b} gives C{a.b}
    (a sub-module or a name in C{a}: the layer is the same).
    """
    if source is None:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                yield Import(module, path, node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base)


def layer_of(module: str) -> Optional[str]:
    """
    The layer C{module} belongs to: the longest L{LAYERS} name that is it
    or contains it (the package alone is only C{smeldr_oauth/__init__}).
    """
    best = None
    for layer in LAYERS:
        if module == layer or (layer != PACKAGE and module.startswith(layer + ".")):
            if best is None or len(layer) > len(best):
                best = layer
    return best


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def all_imports() -> list[Import]:
    return [i for module, path, init in modules() for i in imports_of(module, path, init)]


def layering_problems(found: list[Import]) -> list[str]:
    """
    Each import that breaks a rule, with the rule it breaks.
    """
    problems = []
    for i in found:
        source = layer_of(i.module)
        if source is None:
            problems.append(f"{i.module} is in no layer: give its package a line in LAYERS")
            continue
        allowed = LAYERS[source]
        if i.target.startswith(PACKAGE + "."):
            target = layer_of(i.target)
            if target is None:
                problems.append(f"{i}: {i.target} is in no layer")
            elif allowed is not None and target != source and target not in allowed:
                names = ", ".join(sorted(a.rpartition(".")[2] for a in allowed)) or "nothing of ours"
                problems.append(f"{i}: {source} may import {names}, not {target}")
        if _within(source, NO_SERVER_HTTP) and source != _MCP_HTTP and _within(i.target, SERVER_HTTP):
            problems.append(f"{i}: {source} leaves the server side of HTTP to web/, mcp/http/ and service/")
        if i.target in ("twisted.internet.reactor", "twisted.internet.reactor.reactor"):
            if not (source in REACTOR_IMPORTERS or i.module in REACTOR_IMPORTERS):
                problems.append(f"{i}: only {', '.join(sorted(REACTOR_IMPORTERS))} import the global reactor")
    return problems


def package_cycles(found: list[Import]) -> list[list[str]]:
    """
    The cycles among the top-level packages (and C{mcp.http}) that the
    imports draw, each as a path that ends where it starts.
    """

    def unit(name: str) -> Optional[str]:
        if not name.startswith(PACKAGE + "."):
            return None
        if _within(name, (_MCP_HTTP,)):
            return _MCP_HTTP
        return ".".join(name.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for i in found:
        a, b = unit(i.module), unit(i.target)
        if a is not None and b is not None and a != b:
            graph.setdefault(a, set()).add(b)
    cycles = []
    seen: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen.add(node)

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    return cycles


class LayeringTests(SynchronousTestCase):
    def test_layers(self) -> None:
        """
        Every import keeps to the layers: the protocol cores import none of
        the HTTP edge, the stores, the database or the wiring; the stores
        import no HTTP and no MCP; the HTTP edge no wiring; only
        C{service/} ties everything together.
        """
        problems = layering_problems(all_imports())
        self.assertEqual(problems, [], "\n" + "\n".join(problems))

    def test_noPackageCycles(self) -> None:
        """
        No two packages import each other, however indirectly.
        """
        cycles = package_cycles(all_imports())
        self.assertEqual(cycles, [], "\n" + "\n".join(" -> ".join(c) for c in cycles))

    def test_allowedIsADAG(self) -> None:
        """
        The rules themselves run one way: no layer may import one that may
        import it back.
        """
        for layer, allowed in LAYERS.items():
            for other in allowed or ():
                back = LAYERS[other]
                self.assertFalse(back is None or layer in back, f"{layer} and {other} may import each other")

    def test_everyModuleRead(self) -> None:
        """
        The walk sees the whole package (a test that reads nothing passes
        everything): the layers' own modules, nested packages included.
        """
        names = {module for module, _, _ in modules()}
        for expected in ("smeldr_oauth.oauth.rotation", "smeldr_oauth.mcp.http.streamable", "smeldr_oauth.service.tap",
                         "smeldr_oauth.oauth.cimd.resolver", "smeldr_oauth.site.posts.store"):
            self.assertIn(expected, names)
        self.assertGreater(len(all_imports()), 500)


class SizeTests(SynchronousTestCase):
    def test_modulesHeldInTheHead(self) -> None:
        """
        No module grows past L{MAX_LINES} lines unless it is listed, with
        the reason, in L{OVERSIZE}.
        """
        over = []
        for module, path, _ in modules():
            with open(path, encoding="utf-8") as f:
                lines = sum(1 for _ in f)
            if lines > MAX_LINES and module not in OVERSIZE:
                over.append(f"{os.path.relpath(path, CHECKOUT)}: {lines} lines")
        self.assertEqual(over, [], "\ncut by concern: " + "\n".join(over))


class DocumentedTests(SynchronousTestCase):
    def test_everyLayerDocumented(self) -> None:
        """
        C{docs/architecture.md} has a row for every package layer, and no
        row for one that is gone.
        """
        path = os.path.join(CHECKOUT, "docs", "architecture.md")
        with open(path, encoding="utf-8") as f:
            rows = {line.split("`")[1] for line in f if line.startswith("| `")}
        packages = {
            layer[len(PACKAGE) + 1 :].replace(".", "/") + "/"
            for layer in LAYERS
            if layer != PACKAGE and os.path.isdir(os.path.join(ROOT, *layer.split(".")[1:]))
        }
        self.assertEqual(rows, packages)


class RulesTests(SynchronousTestCase):
    """
    The checks find what they are for: a bad import in a crafted module.
    """

    def problems(self, module: str, source: str, is_package: bool = False) -> list[str]:
        return layering_problems(list(imports_of(module, f"/x/{module}.py", is_package, source)))

    def test_upward(self) -> None:
        found = self.problems("smeldr_oauth.oauth.tokens", "def f():\n    from smeldr_oauth.store import sql\n")
        self.assertEqual(len(found), 1)
        self.assertIn(":2 imports smeldr_oauth.store.sql: smeldr_oauth.oauth may import nothing of ours", found[0])

    def test_relative(self) -> None:
        """
        A relative import is resolved before it is judged.
        """
        self.assertEqual(len(self.problems("smeldr_oauth.store.sql", "from ..web import routes\n")), 1)
        self.assertEqual(self.problems("smeldr_oauth.store.sql", "from .common import x\nfrom ..oauth import model\n"), [])
        self.assertEqual(len(self.problems("smeldr_oauth.mcp", "from .http import x\n", is_package=True)), 1)

    def test_serverHTTP(self) -> None:
        self.assertEqual(len(self.problems("smeldr_oauth.mcp.app", "import klein\n")), 1)
        self.assertEqual(len(self.problems("smeldr_oauth.oauth.model", "from twisted.web import server\n")), 1)
        self.assertEqual(self.problems("smeldr_oauth.oauth.netguard", "from twisted.web.client import Agent\n"), [])
        self.assertEqual(self.problems("smeldr_oauth.mcp.http.cors", "from twisted.web.server import Request\n"), [])

    def test_reactor(self) -> None:
        self.assertEqual(len(self.problems("smeldr_oauth.mcp.session", "from twisted.internet import reactor\n")), 1)
        self.assertEqual(self.problems("smeldr_oauth.service.tap", "from twisted.internet import reactor\n"), [])

    def test_unknownPackage(self) -> None:
        self.assertEqual(len(self.problems("smeldr_oauth.newthing.x", "import os\n")), 1)

    def test_cycle(self) -> None:
        found = [
            *imports_of("smeldr_oauth.store.sql", "/x/a.py", False, "from smeldr_oauth.oauth import model\n"),
            *imports_of("smeldr_oauth.oauth.model", "/x/b.py", False, "from smeldr_oauth.store import sql\n"),
        ]
        self.assertEqual(package_cycles(found), [[_OAUTH, _STORE, _OAUTH]])
