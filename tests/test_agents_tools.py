"""hanlin.agents tools: schemas derived from functions, argument checking, and the built-in
tools, each tried the way a careless or hostile model would use it. Everything here is real:
real files and symlinks, real HTTP servers on 127.0.0.1, real sandboxed processes."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Annotated, Literal, Optional

import pytest

from hanlin.agents import (
    CalculatorError,
    Tool,
    ToolError,
    Toolbox,
    ToolsConfig,
    builtin_tools,
    calculator,
    http_fetch_tool,
    python_tool,
    read_file_tool,
    tool,
)
from hanlin.agents.calculator import evaluate
from hanlin.evaluate.sandbox import Limits, run_python

SMALL = Limits(wall_seconds=4, cpu_seconds=4, memory_mb=256, processes=16, file_mb=16)
as_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="as a non-root user the sandbox runs as that same user: its files and processes are within reach",
)


# ---------------------------------------------------------------------------------------
# Tool, @tool, Toolbox


@tool
def search_flights(
    origin: str,
    destination: str,
    date: str,
    passengers: int = 1,
    cabin: Literal["economy", "business", "first"] = "economy",
    max_price: Optional[float] = None,
    airlines: list[str] | None = None,
    direct_only: bool = False,
    note: Annotated[str, "free text for the agent"] = "",
) -> dict:
    """Search flights between two airports on one day.

    Results come cheapest first.

    Args:
        origin: IATA code of the departure airport, e.g. "PEK".
        destination: IATA code of the arrival airport.
        date: the day of departure,
            as YYYY-MM-DD.
        passengers (int): how many seats are needed.
        cabin: the travel class.
        max_price: the highest fare in USD.
        airlines: only flights of these carriers.
        direct_only: leave out connecting flights.

    Returns:
        The matching flights.
    """
    return {"from": origin, "to": destination, "date": date, "passengers": passengers, "cabin": cabin,
            "max_price": max_price, "airlines": airlines, "direct_only": direct_only}  # fmt: skip


EXPECTED_PARAMETERS = {
    "type": "object",
    "properties": {
        "origin": {"type": "string", "description": 'IATA code of the departure airport, e.g. "PEK".'},
        "destination": {"type": "string", "description": "IATA code of the arrival airport."},
        "date": {"type": "string", "description": "the day of departure, as YYYY-MM-DD."},
        "passengers": {"type": "integer", "description": "how many seats are needed.", "default": 1},
        "cabin": {"type": "string", "enum": ["economy", "business", "first"], "description": "the travel class.",
                  "default": "economy"},
        "max_price": {"type": "number", "description": "the highest fare in USD."},
        "airlines": {"type": "array", "items": {"type": "string"}, "description": "only flights of these carriers."},
        "direct_only": {"type": "boolean", "description": "leave out connecting flights.", "default": False},
        "note": {"type": "string", "description": "free text for the agent", "default": ""},
    },
    "required": ["origin", "destination", "date"],
    "additionalProperties": False,
}  # fmt: skip


def test_schema_is_derived_from_hints_and_docstring():
    assert isinstance(search_flights, Tool)
    assert search_flights.name == "search_flights"
    assert search_flights.description == "Search flights between two airports on one day."
    assert search_flights.parameters == EXPECTED_PARAMETERS
    assert search_flights.schema() == {
        "type": "function",
        "function": {"name": "search_flights", "description": search_flights.description, "parameters": EXPECTED_PARAMETERS},
    }
    # still a plain function for Python callers
    assert search_flights("PEK", "SHA", "2025-05-01")["cabin"] == "economy"

    renamed = tool(name="flights", description="Find flights.")(search_flights.function)
    assert renamed.schema()["function"]["name"] == "flights" and renamed.description == "Find flights."


def test_schemas_are_what_the_server_accepts():
    """Toolbox.schemas() is the `tools` list of /v1/chat/completions: the server's own model
    of a tool must accept every schema, built-ins included."""
    pytest.importorskip("fastapi")
    from hanlin.apps.server.chat import Tool as ServerTool

    box = builtin_tools(ToolsConfig(workspace=os.getcwd(), allowed_hosts=("example.com",)))
    box.add(search_flights)
    assert box.names() == ["calculator", "python", "read_file", "http_fetch", "search_flights"]
    for schema in box.schemas():
        parsed = ServerTool.model_validate(schema)
        assert parsed.function.parameters == schema["function"]["parameters"]
        assert parsed.function.description
    assert "example.com" in box["http_fetch"].description
    with pytest.raises(ValueError, match="already"):
        box.add(calculator)


def test_functions_that_cannot_be_described_are_refused_when_made():
    def untyped(city, days: int) -> str:
        return ""

    with pytest.raises(TypeError, match="'city' has no type hint"):
        tool(untyped)

    def star(*words: str) -> str:
        return ""

    with pytest.raises(TypeError, match="'words'"):
        tool(star)

    def odd(when: socket.socket) -> str:
        return ""

    with pytest.raises(TypeError, match="'when'.*no JSON Schema"):
        tool(odd)
    with pytest.raises(ValueError, match="tool name"):
        tool(lambda x: x)


@pytest.mark.parametrize(
    "arguments, parameter, message",
    [
        ({"destination": "SHA", "date": "2025-05-01"}, "origin", "missing required parameter 'origin'"),
        ({"origin": "PEK", "destination": "SHA", "date": "d", "colour": "red"}, "colour", "unknown parameter 'colour'"),
        ({"origin": "PEK", "destination": "SHA", "date": "d", "passengers": "two"}, "passengers",
         "parameter 'passengers' must be an integer, got the string 'two'"),
        ({"origin": "PEK", "destination": "SHA", "date": "d", "passengers": True}, "passengers", "must be an integer"),
        ({"origin": "PEK", "destination": "SHA", "date": "d", "passengers": 1.5}, "passengers", "got the number 1.5"),
        ({"origin": "PEK", "destination": "SHA", "date": "d", "cabin": "premium"}, "cabin",
         'must be one of "economy", "business", "first"'),
        ({"origin": "PEK", "destination": "SHA", "date": "d", "airlines": ["CA", 3]}, "airlines",
         "parameter 'airlines[1]' must be a string"),
        ({"origin": "PEK", "destination": "SHA", "date": "d", "airlines": "CA"}, "airlines", "must be a list of strings"),
        ({"origin": 7, "destination": "SHA", "date": "d"}, "origin", "must be a string, got the number 7"),
        ({"origin": None, "destination": "SHA", "date": "d"}, "origin", "must be a string, got null"),
    ],
)  # fmt: skip
def test_bad_arguments_are_a_tool_error_naming_the_parameter(arguments, parameter, message):
    with pytest.raises(ToolError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        search_flights.call(arguments)
    assert caught.value.parameter == parameter
    # the same call through run() and a Toolbox is an error result, not an exception
    result = Toolbox([search_flights]).run("search_flights", json.dumps(arguments))
    assert not result.ok and result.content.startswith("Error: search_flights:") and parameter in result.content


def test_arguments_as_json_text_and_loose_json():
    out = json.loads(search_flights.call('{"origin": "PEK", "destination": "SHA", "date": "d", "passengers": 2.0, "max_price": null}'))
    assert out["passengers"] == 2 and isinstance(out["passengers"], int) and out["max_price"] is None
    with pytest.raises(ToolError, match="not valid JSON"):
        search_flights.call('{"origin": "PEK",')
    with pytest.raises(ToolError, match="must be a JSON object"):
        search_flights.call("[1, 2]")
    box = Toolbox([search_flights])
    with pytest.raises(ToolError, match="no tool named 'book'.*search_flights"):
        box.call("book", {})
    result = box.run("book", {})
    assert not result.ok and "search_flights" in result.content


def test_exceptions_inside_a_tool_are_error_results():
    @tool
    def divide(a: float, b: float, label: Optional[str]) -> float:
        """Divide a by b."""
        if label == "raise":
            raise ToolError("label may not be 'raise'")
        return a / b

    assert divide.parameters["required"] == ["a", "b"]  # Optional: not required, None when left out
    assert divide.call({"a": 1, "b": 4}) == "0.25"
    assert divide.call({"a": 1, "b": 0}) == "Error: ZeroDivisionError: division by zero"
    with pytest.raises(ToolError, match="label may not be 'raise'"):  # a tool's own refusal
        divide.call({"a": 1, "b": 2, "label": "raise"})
    refused = divide.run({"a": 1, "b": 2, "label": "raise"})
    assert not refused.ok and refused.content == "Error: label may not be 'raise'"
    assert divide.run({"a": 1, "b": 2}).ok


# ---------------------------------------------------------------------------------------
# calculator


@pytest.mark.parametrize(
    "expression, value",
    [("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("2 ** 10", "1024"), ("7 // 2", "3"), ("-7 % 3", "2"),
     ("-3 ** 2", "-9"), ("1 / 4", "0.25"), ("0.1 + 0.2", "0.3"), ("sqrt(16) + pi", "7.14159265358979"),
     ("factorial(20)", "2432902008176640000"), ("log(e)", "1"), ("max(1, 5, 3) - min(4, 2)", "3"),
     ("round(2.5) + round(3.14159, 2)", "5.14"), ("2 ** 100", str(2**100)), ("1_000 * 3", "3000"),
     ("atan2(1, 1) * 4", "3.14159265358979"), ("10 ** -2", "0.01")],
)  # fmt: skip
def test_calculator_values(expression, value):
    assert calculator.call({"expression": expression}) == value


@pytest.mark.parametrize(
    "expression, reason",
    [("__import__('os')", "unknown function '__import__'"),
     ("__import__('os').system('id')", "attributes are not allowed"),
     ("().__class__.__bases__[0].__subclasses__()", "attributes are not allowed"),
     ("open('/etc/passwd')", "unknown function 'open'"),
     ("math.sqrt(4)", "attributes are not allowed.*write sqrt"),
     ("eval('1 + 1')", "unknown function 'eval'"),
     ("x + 1", "unknown name 'x'"),
     ("(lambda: 1)()", "unknown function"),
     ("[1, 2][0]", "Subscript is not allowed"),
     ("'a' * 3", "only numbers"),
     ("True + 1", "only numbers"),
     ("2 ^ 3", r"write 2 \*\* 3"),
     ("1 << 100000", "operator LShift is not supported"),
     ("sqrt(x=4)", "positional arguments only"),
     ("1 < 2", "Compare is not allowed"),
     ("1 +", "not an arithmetic expression"),
     ("1 / 0", "division by zero"),
     ("sqrt(-1)", "math domain error"),
     ("(-8) ** (1 / 3)", "complex"),
     ("1" + "+1" * 300, "longer than 500")],
)  # fmt: skip
def test_calculator_refuses_what_is_not_arithmetic(expression, reason):
    with pytest.raises(CalculatorError, match=reason):
        evaluate(expression)
    result = calculator.run({"expression": expression})
    assert not result.ok and result.content.startswith("Error: ")


@pytest.mark.parametrize(
    "expression",
    ["9**9**9", "10 ** 100000", "2 ** 2 ** 64", "(2 ** 9000) * (2 ** 9000)", "factorial(10 ** 6)", "comb(10 ** 7, 5 * 10 ** 6)",
     "1e308 * 10", "10.0 ** 400", "exp(1000)", "round(5, -10 ** 9)", "-(-(-(-(-(-(-(-(-(-(-(9 ** 9 ** 9)))))))))))"],
)  # fmt: skip
def test_calculator_refuses_huge_results_at_once(expression):
    start = time.monotonic()
    result = calculator.run({"expression": expression})
    assert time.monotonic() - start < 0.5, expression
    assert not result.ok and ("too large" in result.content or "finite" in result.content or "limited" in result.content
                              or "digits" in result.content), result  # fmt: skip


# ---------------------------------------------------------------------------------------
# read_file


@pytest.fixture
def workspace(tmp_path):
    """tmp_path/ws holds the agent's files; tmp_path/secret.txt is outside it."""
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "notes.txt").write_text("buy milk\n")
    (ws / "sub" / "deep.md").write_text("# Deep\n")
    (ws / "big.txt").write_text("x" * 5000)
    (ws / "blob.bin").write_bytes(b"\x89PNG\0\0\0binary")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    os.symlink(secret, ws / "leak.txt")  # absolute target outside
    os.symlink("../../secret.txt", ws / "sub" / "relative_leak.txt")  # relative target outside
    os.symlink(tmp_path, ws / "outdir")  # a directory outside
    os.symlink("notes.txt", ws / "alias.txt")  # stays inside: allowed
    os.mkfifo(ws / "pipe")
    return ws


def test_read_file_reads_inside_the_workspace(workspace):
    read = read_file_tool(workspace, max_bytes=1000)
    assert read.call({"path": "notes.txt"}) == "buy milk\n"
    assert read.call({"path": "sub/deep.md"}) == "# Deep\n"
    assert read.call({"path": "./notes.txt"}) == "buy milk\n"
    assert read.call({"path": "alias.txt"}) == "buy milk\n"
    assert read.call({"path": str(workspace / "notes.txt")}) == "buy milk\n"  # absolute, but inside
    cut = read.call({"path": "big.txt"})
    assert cut.startswith("x" * 1000) and "x" * 1001 not in cut and "the file has 5,000 bytes" in cut
    listing = read.call({"path": "."})
    assert "notes.txt" in listing and "sub/" in listing


@pytest.mark.parametrize(
    "path, reason",
    [("../secret.txt", "contains '..'"), ("sub/../../secret.txt", "contains '..'"), ("SECRET_ABSOLUTE", "outside the workspace"),
     ("leak.txt", "through a symbolic link"), ("sub/relative_leak.txt", "through a symbolic link"),
     ("outdir/secret.txt", "through a symbolic link"), ("/etc/passwd", "outside the workspace"),
     ("missing.txt", "no file 'missing.txt'"), ("blob.bin", "binary"), ("pipe", "not a regular file"), ("", "empty")],
)  # fmt: skip
def test_read_file_refuses_escapes(workspace, path, reason):
    path = str(workspace.parent / "secret.txt") if path == "SECRET_ABSOLUTE" else path
    read = read_file_tool(workspace)
    with pytest.raises(ToolError, match=reason):
        read.call({"path": path})
    result = read.run({"path": path})
    assert not result.ok and "TOPSECRET" not in result.content


# ---------------------------------------------------------------------------------------
# http_fetch


class _Site(http.server.BaseHTTPRequestHandler):
    evil_url = ""

    def do_GET(self):  # noqa: N802
        self.server.hits.append(self.path)
        routes = {
            "/": (200, "text/html; charset=utf-8", b"<html><head><title>Home</title><script>var s='SCRIPT';</script></head>"
                                                   b"<body><h1>Hello</h1><p>a &amp; b</p></body></html>"),
            "/text": (200, "text/plain", b"plain words"),
            "/big": (200, "text/plain", b"y" * (1 << 20)),
            "/image": (200, "image/png", b"\x89PNG"),
            "/missing": (404, "text/plain", b"nope"),
        }  # fmt: skip
        if self.path == "/slow":
            time.sleep(2)
        if self.path in ("/to-evil", "/to-self", "/loop"):
            target = {"/to-evil": self.evil_url, "/to-self": "/text", "/loop": "/loop"}[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        code, kind, body = routes.get(self.path, (200, "text/plain", b"served " + self.path.encode()))
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:  # the client read what it wanted and hung up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    """Two real servers on 127.0.0.1: `site` (allowed in the tests) and `evil`, which must
    never be reached; yields (site, evil) with `.port` and `.hits`."""
    started = []
    for _ in range(2):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
        server.daemon_threads = True
        server.hits = []
        server.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(server)
    site, evil = started
    _Site.evil_url = f"http://localhost:{evil.port}/stolen"
    yield site, evil
    for server in started:
        server.shutdown()
        server.server_close()


def test_http_fetch_is_off_unless_hosts_are_allowed(servers):
    site, _ = servers
    off = http_fetch_tool()
    with pytest.raises(ToolError, match="off"):
        off.call({"url": f"http://127.0.0.1:{site.port}/text"})
    assert "none (the tool is off)" in off.description
    assert site.hits == []


def test_http_fetch_allowed_host_and_redirects(servers):
    site, evil = servers
    fetch = http_fetch_tool(["127.0.0.1"])
    home = fetch.call({"url": f"http://127.0.0.1:{site.port}/"})
    assert home.startswith(f"http://127.0.0.1:{site.port}/ (HTTP 200, text/html)")
    assert "Hello" in home and "a & b" in home and "SCRIPT" not in home and "<p>" not in home
    followed = fetch.call({"url": f"http://127.0.0.1:{site.port}/to-self"})
    assert followed.startswith(f"http://127.0.0.1:{site.port}/text") and followed.endswith("plain words")

    # a redirect to a host not on the list is refused before it is followed
    with pytest.raises(ToolError, match=f"redirects to http://localhost:{evil.port}/stolen.*'localhost' is not allowed"):
        fetch.call({"url": f"http://127.0.0.1:{site.port}/to-evil"})
    # and so is asking for that host directly
    with pytest.raises(ToolError, match="'localhost' is not allowed; the allowed hosts are: 127.0.0.1"):
        fetch.call({"url": f"http://localhost:{evil.port}/direct"})
    assert evil.hits == []
    # control: the evil server is reachable, so the refusals above are the tool's doing
    assert http_fetch_tool(["localhost"]).call({"url": f"http://localhost:{evil.port}/direct"}).endswith("served /direct")
    assert evil.hits == ["/direct"]

    # a port-restricted entry lets only that port through
    only_site = http_fetch_tool([f"127.0.0.1:{site.port}"])
    assert only_site.call({"url": f"http://127.0.0.1:{site.port}/text"}).endswith("plain words")
    with pytest.raises(ToolError, match="not allowed"):
        only_site.call({"url": f"http://127.0.0.1:{evil.port}/text"})
    assert evil.hits == ["/direct"]


@pytest.mark.parametrize(
    "url, reason",
    [("file:///etc/passwd", "only http:// and https://"), ("ftp://127.0.0.1/x", "only http:// and https://"),
     ("gopher://127.0.0.1:70/", "only http:// and https://"), ("http://127.0.0.1@localhost/", "'localhost' is not allowed"),
     ("http:///nohost", "no host"), ("http://127.0.0.1:99999/", "not a valid URL")],
)  # fmt: skip
def test_http_fetch_refuses_other_schemes_and_hosts(url, reason):
    with pytest.raises(ToolError, match=reason):
        http_fetch_tool(["127.0.0.1"]).call({"url": url})


def test_http_fetch_limits(servers):
    site, _ = servers
    base = f"http://127.0.0.1:{site.port}"
    small = http_fetch_tool(["127.0.0.1"], max_bytes=1000, timeout=0.5, max_redirects=2)
    cut = small.call({"url": base + "/big"})
    assert "y" * 1000 in cut and "y" * 1001 not in cut and cut.endswith("[... cut at 1,000 bytes]")
    start = time.monotonic()
    with pytest.raises(ToolError, match="did not answer within 0.5 s"):
        small.call({"url": base + "/slow"})
    assert time.monotonic() - start < 1.5
    with pytest.raises(ToolError, match="more than 2 redirects"):
        small.call({"url": base + "/loop"})
    with pytest.raises(ToolError, match="image/png, not text"):
        small.call({"url": base + "/image"})
    with pytest.raises(ToolError, match="HTTP 404"):
        small.call({"url": base + "/missing"})


# ---------------------------------------------------------------------------------------
# python: the sandbox holds


@pytest.fixture
def python(workspace):
    return python_tool(workspace, limits=SMALL)


def test_python_runs_code_on_a_copy_of_the_workspace(python, workspace):
    code = (
        "import json, os\n"
        "print(open('notes.txt').read().strip(), open('sub/deep.md').read().strip(), open('alias.txt').read().strip())\n"
        "open('notes.txt', 'w').write('overwritten')\n"
        "open('new.txt', 'w').write('made')\n"
        "print(json.dumps([sorted(os.listdir('.')), os.listdir('sub')]))\n"
    )
    out = python.call({"code": code})
    assert out.startswith("exit: ok"), out
    stdout = out.split("stdout:\n")[1].splitlines()
    assert stdout[0] == "buy milk # Deep buy milk"
    # links leading outside and special files were not copied, and the model is told so
    top, sub = json.loads(stdout[1])
    assert top == ["alias.txt", "big.txt", "blob.bin", "main.py", "new.txt", "notes.txt", "sub"] and sub == ["deep.md"]
    notes = out.split("not copied from the workspace: ")[1]
    assert "leak.txt" in notes and "sub/relative_leak.txt" in notes and "outdir" in notes and "pipe" in notes
    # the workspace itself is untouched
    assert (workspace / "notes.txt").read_text() == "buy milk\n" and not (workspace / "new.txt").exists()

    failed = python.call({"code": "def f():\n    raise ValueError('boom')\nf()\n"})
    assert failed.startswith("exit: failed with exit code 1") and "ValueError: boom" in failed
    assert 'File "main.py", line 3' in failed and "hanlin-sandbox-" not in failed
    assert "(no output" in python.call({"code": "x = 1"})


@as_root
def test_python_cannot_read_outside_the_workspace(python, tmp_path):
    secret = tmp_path / "secret.txt"
    tmp_path.chmod(0o700)  # a private directory, like a home directory
    code = (
        "import os\n"
        f"for path in [{str(secret)!r}, '/root/.bashrc', '/proc/1/environ']:\n"
        "    try:\n"
        "        print('READ', path, open(path).read()[:40])\n"
        "    except OSError as exc:\n"
        "        print('refused', path, type(exc).__name__)\n"
    )
    out = python.call({"code": code})
    assert "TOPSECRET" not in out and "READ" not in out, out
    assert f"refused {secret} PermissionError" in out
    assert secret.read_text() == "TOPSECRET"  # control: the file is there and readable to us


def test_python_cannot_reach_a_loopback_server(python):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def serve():
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.close()

    stop = threading.Event()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\nprint('CONNECTED')\n"
        plain = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=10, check=False)
        assert "CONNECTED" in plain.stdout and len(accepted) == 1  # control: the server is reachable
        out = python.call({"code": client})
        assert "CONNECTED" not in out and "exit: failed" in out and "Error" in out, out
        assert len(accepted) == 1
    finally:
        stop.set()
        thread.join(2)
        server.close()


@as_root
def test_python_fork_bomb_is_bounded():
    limits = Limits(wall_seconds=3, cpu_seconds=10, memory_mb=256, processes=16)
    python = python_tool(limits=limits)
    start = time.monotonic()
    out = python.call({"code": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"})
    assert not out.startswith("exit: ok") and time.monotonic() - start < limits.wall_seconds + 4, out
    assert python.call({"code": "print('still fine')"}).endswith("stdout:\nstill fine")


def test_python_allocation_without_end_runs_out_of_memory(python):
    out = python.call({"code": "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n"})
    assert out.startswith("exit: out of memory: the limit is 256 MB"), out
    assert "MemoryError" in out


def test_python_endless_loop_is_stopped(workspace):
    python = python_tool(workspace, limits=Limits(wall_seconds=2, cpu_seconds=30, memory_mb=256))
    start = time.monotonic()
    out = python.call({"code": "while True:\n    pass\n"})
    assert out.startswith("exit: timeout: stopped after the 2 s wall-clock limit"), out
    assert time.monotonic() - start < 4


def test_python_cannot_write_10_gb(python):
    code = (
        "chunk = b'0' * (1 << 20)\n"
        "with open('huge.bin', 'wb', buffering=0) as f:\n"
        "    try:\n"
        "        for _ in range(10 * 1024):\n"
        "            f.write(chunk)\n"
        "    except OSError as exc:\n"
        "        print('stopped at', f.tell(), exc)\n"
        "        raise\n"
    )
    start = time.monotonic()
    out = python.call({"code": code})
    assert "File too large" in out and not out.startswith("exit: ok"), out
    written = int(out.split("stopped at ")[1].split()[0])
    assert written <= SMALL.file_mb << 20
    assert time.monotonic() - start < SMALL.wall_seconds


@as_root
def test_python_cannot_kill_the_parent(python):
    # signal 0 first: a permission check that kills nothing, so a sandbox that does not
    # hold fails this test instead of killing the test run
    code = (
        "import os\n"
        "print('parent', os.getppid())\n"
        "try:\n"
        "    os.kill(os.getppid(), 0)\n"
        "    print('CAN SIGNAL THE PARENT')\n"
        "except PermissionError:\n"
        "    os.kill(os.getppid(), 9)\n"
    )
    out = python.call({"code": code})
    assert f"parent {os.getpid()}" in out, out  # it aimed at this very process
    assert "CAN SIGNAL" not in out and "PermissionError" in out and out.startswith("exit: failed")


def test_python_inherits_no_secrets(python, monkeypatch):
    monkeypatch.setenv("HANLIN_AGENT_SECRET", "s3cret-token")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-123")
    out = python.call({"code": "import os, json\nprint(json.dumps(sorted(os.environ)))\nprint(dict(os.environ))"})
    assert "s3cret-token" not in out and "sk-live-123" not in out, out
    names = json.loads(out.split("stdout:\n")[1].splitlines()[0])
    assert names == sorted(["PATH", "LANG", "LC_ALL", "HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED"])


def test_sandbox_files_are_checked():
    """The sandbox's `files` (how the python tool hands over the workspace) take relative
    paths only; main.py is the sandbox's own script."""
    for bad in ("../x", "/etc/x", "a//b", "./a", "main.py"):
        with pytest.raises(ValueError, match="files"):
            run_python("pass", files={bad: "x"})
    with pytest.raises(ValueError, match="both as a file and as a folder"):
        run_python("pass", files={"a": "1", "a/b": "2"})
    code = "import os\nprint(open('d/x.csv').read(), open('raw', 'rb').read(), os.stat('d/x.csv').st_uid == os.getuid())"
    result = run_python(code, limits=SMALL, files={"d/x.csv": "1,2", "raw": b"\0"})
    assert result.ok and result.stdout == "1,2 b'\\x00' True\n", result
