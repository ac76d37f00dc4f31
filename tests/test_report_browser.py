"""The HTML report renders in a real browser: headless Chromium (Debian's `chromium` package) driven over
the DevTools protocol on a pipe (stdlib only). It must load with its images decoded, log no console error,
exception or blocked request, and a screenshot is taken. No chromium is a failure, never a skip."""

import base64
import json
import os
import select
import shutil
import subprocess
import time

from preftune.report import write_report

INSTALL = "apt-get update && apt-get install -y chromium"


class DevTools:
    """Chrome DevTools protocol over --remote-debugging-pipe: NUL-terminated JSON on fds 3 (in) and 4 (out)."""

    def __init__(self, binary: str, profile: str):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        os.set_inheritable(to_browser_r, True)
        os.set_inheritable(from_browser_w, True)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", "--window-size=1280,1600"]
        # the child must see the pipe ends as fds 3 and 4
        self.proc = subprocess.Popen([binary, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     pass_fds=(3, 4), preexec_fn=lambda: (os.dup2(to_browser_r, 3),
                                                                          os.dup2(from_browser_w, 4)))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            # wait for the pipe under the deadline: a bare os.read blocks for ever on a browser that hangs
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self._from_browser], [], [], max(0.0, left))
            assert readable, "chromium did not answer within the time limit"
            chunk = os.read(self._from_browser, 1 << 16)
            assert chunk, "chromium closed the DevTools pipe"
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, f"chromium is required for this test; install it with: {INSTALL}"

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {path: tiny}\nloss: {name: dpo, beta: 0.1}\n")
    rows = [{"step": s, "loss": 0.69 - 0.02 * s, "rewards/accuracies": min(1.0, 0.5 + 0.05 * s),
             "rewards/margins": 0.1 * s, "rewards/chosen": 0.05 * s, "rewards/rejected": -0.05 * s}
            for s in range(1, 11)]
    for r in rows[4::5]:
        r.update({"eval/loss": r["loss"] + 0.05, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.05,
                  "eval/rewards/chosen": 0.02, "eval/rewards/rejected": -0.03, "eval/kl": 0.1 * r["step"]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stat = {"mean": 0.6, "low": 0.4, "high": 0.8}
    (run_dir / "eval.json").write_text(json.dumps({
        "data": "heldout.jsonl", "pairs": 20, "loss": "dpo", "beta": 0.1, "level": 0.95,
        "metrics": {"rewards/accuracies": stat, "rewards/margins": stat}, "kl": stat | {"samples": 8},
        "win_rate": stat | {"judge": "length", "prompts": 8}, "sampling": {"prompts": 8}}))
    (run_dir / "samples.jsonl").write_text(json.dumps({
        "prompt": "<img src=x onerror=alert(1)><script>console.error('pwned')</script>", "sample": 0,
        "policy": "Great film!", "reference": "It was fine."}) + "\n")
    report = write_report(run_dir)

    browser = DevTools(binary, str(tmp_path / "profile"))
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session)
        browser.call("Page.navigate", session, url=report.as_uri())
        browser.wait_for("Page.loadEventFired")
        state = browser.call("Runtime.evaluate", session, returnByValue=True, expression="""JSON.stringify({
            title: document.title,
            images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
            tables: document.querySelectorAll('table').length,
            text: document.body.innerText})""")
        state = json.loads(state["result"]["value"])
        shot = browser.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
        browser.call("Runtime.evaluate", session, expression="1")  # drain late console events
    finally:
        browser.close()

    errors = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown",)
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    assert state["title"] == "preftune run run"
    assert len(state["images"]) == 5 and all(ok and w > 100 and h > 100 for ok, w, h in state["images"])
    assert state["tables"] >= 4  # run facts, metrics, sampled summary, samples
    assert "<script>console.error('pwned')</script>" in state["text"]  # shown as text, never run
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
