"""The http_fetch tool: GET a page from a host the user allowed, and nothing else.

It is off unless the user names hosts: with none, every call is refused with a message
saying how to turn it on. Each hop is checked before it is made: the scheme must be http
or https and the host (and port, when the entry gives one) must be on the list; redirects
are followed by hand, so a redirect to a host not on the list is refused rather than
silently followed. The body is read up to a size limit and within a time limit; HTML comes
back as its text. Hosts are matched by name, as the URL gives them: an allowed name that
resolves to an internal address is the user's choice to make, not the tool's.
"""

from __future__ import annotations

import html.parser
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterable

from .tools import Tool, ToolError, tool

REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "hanlin-agent/0.1"
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml+xml", "application/javascript",
              "application/ld+json", "application/rss+xml", "application/atom+xml")  # fmt: skip


@dataclass(frozen=True)
class FetchPolicy:
    """What http_fetch may do. `allowed_hosts` entries: "example.com" (any port),
    "example.com:8080" (that port only), "*.example.com" (its subdomains), IPs alike."""

    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 512 * 1024  # of the body; more is cut, with a note
    timeout: float = 10.0  # seconds for the whole fetch, redirects included (checked between reads)
    max_redirects: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.allowed_hosts, str):
            raise TypeError("allowed_hosts must be a list of host names, not one string")
        for entry in self.allowed_hosts:
            _parse_entry(entry)  # a bad entry is an error now, not a surprise later
        if self.max_bytes <= 0 or self.timeout <= 0 or self.max_redirects < 0:
            raise ValueError("max_bytes and timeout must be positive, max_redirects not negative")

    def check(self, url: str) -> None:
        """Refuse (ToolError) a URL this policy does not allow, before any connection."""
        if not self.allowed_hosts:
            raise ToolError("http_fetch is off: the user has not allowed any host "
                            "(hanlin.agents.http_fetch_tool(allowed_hosts=[...]) turns it on)")  # fmt: skip
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ToolError(f"{url!r} is not a valid URL ({exc})", parameter="url") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ToolError(f"only http:// and https:// URLs can be fetched, not {url!r}", parameter="url")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ToolError(f"{url!r} names no host", parameter="url")
        port = port or (443 if scheme == "https" else 80)
        for entry in self.allowed_hosts:
            pattern, allowed_port = _parse_entry(entry)
            if allowed_port not in (None, port):
                continue
            if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return
        raise ToolError(f"the host {host!r} is not allowed; the allowed hosts are: {', '.join(self.allowed_hosts)}", parameter="url")


def http_fetch_tool(allowed_hosts: Iterable[str] = (), *, max_bytes: int = 512 * 1024, timeout: float = 10.0,
                    max_redirects: int = 5) -> Tool:  # fmt: skip
    """The http_fetch tool, allowed to reach `allowed_hosts` only (none: it is off)."""
    policy = FetchPolicy(tuple(allowed_hosts), max_bytes, timeout, max_redirects)

    def http_fetch(url: str) -> str:
        """Fetch a web page or text file over HTTP(S) and return its text.

        Args:
            url: the full address, starting with http:// or https://.
        """
        return fetch(policy, url)

    made = tool(http_fetch)
    hosts = ", ".join(policy.allowed_hosts) if policy.allowed_hosts else "none (the tool is off)"
    return tool(http_fetch, description=f"{made.description} Allowed hosts: {hosts}.")


def fetch(policy: FetchPolicy, url: str) -> str:
    """GET `url` under `policy`: "<final url> (HTTP <status>, <type>)" and the text."""
    deadline = time.monotonic() + policy.timeout
    opener = urllib.request.build_opener(_NoRedirects)
    for _ in range(policy.max_redirects + 1):
        policy.check(url)
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "text/html, text/*, application/json;q=0.9, */*;q=0.5"})
        try:
            response = opener.open(request, timeout=_left(deadline, url))
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location") if exc.code in REDIRECTS else None
            exc.close()
            if location:
                target = urllib.parse.urljoin(url, location)
                try:
                    policy.check(target)
                except ToolError as refused:
                    raise ToolError(f"{url} redirects to {target}, which is refused: {refused}", parameter="url") from None
                url = target
                continue
            raise ToolError(f"HTTP {exc.code} {exc.reason} from {url}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise ToolError(f"{url} did not answer within {policy.timeout:g} s") from None
            raise ToolError(f"could not fetch {url}: {reason}") from None
        except (TimeoutError, socket.timeout):
            raise ToolError(f"{url} did not answer within {policy.timeout:g} s") from None
        with response:
            return _read(response, url, policy, deadline)
    raise ToolError(f"more than {policy.max_redirects} redirects, the last to {url}")


def _read(response, url: str, policy: FetchPolicy, deadline: float) -> str:
    kind = response.headers.get_content_type()
    if not kind.startswith(TEXT_TYPES):
        raise ToolError(f"{url} is {kind}, not text; http_fetch returns text only")
    chunks, size = [], 0
    try:
        while size <= policy.max_bytes:
            _left(deadline, url)
            chunk = response.read(min(64 * 1024, policy.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, socket.timeout):
        raise ToolError(f"{url} did not finish within {policy.timeout:g} s") from None
    body = b"".join(chunks)
    cut = len(body) > policy.max_bytes
    try:
        text = body[: policy.max_bytes].decode(response.headers.get_content_charset() or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body[: policy.max_bytes].decode("utf-8", errors="replace")
    if kind in ("text/html", "application/xhtml+xml"):
        text = html_text(text)
    head = f"{response.geturl()} (HTTP {response.status}, {kind})"
    note = f"\n[... cut at {policy.max_bytes:,} bytes]" if cut else ""
    return f"{head}\n\n{text}{note}"


def html_text(markup: str) -> str:
    """The readable text of an HTML page: no scripts, styles or tags; blocks on their own lines."""
    parser = _TextParser()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\s*\n\s*", "\n", text).strip()


class _TextParser(html.parser.HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
             "blockquote", "table", "ul", "ol", "title", "header", "footer", "nav"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hand every redirect back as an HTTPError, so fetch() checks its target first."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


def _left(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ToolError(f"fetching {url} took longer than the time limit")
    return left


def _parse_entry(entry: str) -> tuple[str, int | None]:
    """("host", port or None) of an allowed-hosts entry; a ValueError for a malformed one."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"allowed host {entry!r} must be a host name such as 'example.com'")
    text = entry.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    parts = urllib.parse.urlsplit("//" + text.split("/", 1)[0])
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError(f"allowed host {entry!r} must be a host name such as 'example.com'")
    return host, parts.port
