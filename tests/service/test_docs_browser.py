"""`/docs` and `/redoc` render in a real headless browser with no network, from the server's own
assets: Debian's chromium loads each page from a real server on loopback with every other host
unresolvable and every proxied request sent to a dead port, and its DOM after the JavaScript ran
must show the routes (Swagger UI and ReDoc draw them only once their scripts have loaded the
schema). The HTML the server sends, and the DOM after rendering, load nothing from another host.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

BROWSER_TIMEOUT_S = 120
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]"}
# Attributes that make a browser fetch something (links to elsewhere, `<a href>`, are fine).
_LOADING_TAGS = re.compile(r"<(script|link|img|iframe|source|video|audio)\b[^>]*>", re.IGNORECASE)
_URL_ATTRIBUTE = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)
_CSS_IMPORT = re.compile(r"""@import\s+(?:url\()?["']?(https?:)?//""", re.IGNORECASE)


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found is not None:
            return found
    pytest.skip(
        "chromium is not installed, and it could not be installed here: `make system-deps` "
        "installs Debian's chromium (TEST_APT_PACKAGES in the Makefile)"
    )


def external_loads(html: str) -> list[str]:
    """URLs on another host that the page's script, stylesheet, image, ... tags load."""
    found = []
    for tag in _LOADING_TAGS.finditer(html):
        for url in _URL_ATTRIBUTE.findall(tag.group(0)):
            host = urlsplit(url).netloc
            if host and host.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
                found.append(url)
    if _CSS_IMPORT.search(html):
        found.append("an @import of another host's stylesheet")
    return found


def render_offline(url: str, profile: Path) -> str:
    """The DOM of `url` after its scripts ran, in headless chromium without network."""
    command = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",  # tests run as root in CI
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # No network but loopback: names other than 127.0.0.1 do not resolve, and anything the
        # browser would send through a proxy goes to the discard port, where nothing listens.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        # Let the page's scripts fetch /openapi.json and render before the DOM is taken.
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def schema(builtin_server_url: str) -> dict:
    return httpx.get(f"{builtin_server_url}/openapi.json", timeout=30).json()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_served_html_loads_nothing_from_another_host(
    builtin_server_url: str, page: str
) -> None:
    response = httpx.get(builtin_server_url + page, timeout=30)
    assert response.status_code == 200
    assert external_loads(response.text) == []
    assert "fonts.googleapis" not in response.text and "cdn." not in response.text


def test_swagger_ui_renders_every_route_without_network(
    builtin_server_url: str, schema: dict, tmp_path: Path
) -> None:
    dom = render_offline(f"{builtin_server_url}/docs", tmp_path / "profile")
    assert 'class="swagger-ui"' in dom, "Swagger UI did not start: its script did not load"
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert rendered == set(schema["paths"]), (
        f"missing from the page: {set(schema['paths']) - rendered}; "
        f"unexpected: {rendered - set(schema['paths'])}"
    )
    assert "Predict on whole sequences" in dom  # summaries are drawn too
    assert external_loads(dom) == []


def test_redoc_renders_every_operation_without_network(
    builtin_server_url: str, schema: dict, tmp_path: Path
) -> None:
    dom = render_offline(f"{builtin_server_url}/redoc", tmp_path / "profile")
    summaries = {
        operation["summary"]
        for operations in schema["paths"].values()
        for operation in operations.values()
    }
    missing = {summary for summary in summaries if summary not in dom}
    assert not missing, f"ReDoc did not render these operations: {missing}"
    assert external_loads(dom) == []
