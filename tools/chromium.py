"""Headless Chromium driven over the DevTools protocol on a pipe, shared by the docs test and the 3D-viewer tool."""
import base64, fcntl, json, os, re, select, subprocess, time
from pathlib import Path

class Chromium:
    "Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no websocket library needed."
    def __init__(self, profile, flags, chromium="/usr/bin/chromium", size=(1280, 2000)):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
        def fds():
            os.dup2(hi[0], 3); os.dup2(hi[1], 4)
        self.proc = subprocess.Popen([chromium, *flags, f"--user-data-dir={profile}", "--remote-debugging-pipe"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=fds, close_fds=False)
        for fd in (to_chrome_r, from_chrome_w, *hi): os.close(fd)
        self._buf, self._id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"): self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)

    def _read(self, timeout):
        end = time.time() + timeout
        while b"\0" not in self._buf:
            left = end - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]: raise TimeoutError("no reply from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk: raise RuntimeError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, session=False, timeout=60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session: msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m: raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, event, timeout=60):
        end = time.time() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == event: return self.events.pop(i)
            self.events.append(self._read(max(0.1, end - time.time())))

    def open(self, url):
        "Load `url`; return the problems the page reported while loading (console errors, exceptions, failed or remote requests)."
        self.events = []
        nav = self.send("Page.navigate", session=True, url=url)
        if nav.get("errorText"): return [f"navigation: {nav['errorText']}"]
        if nav.get("loaderId"): self.wait_for("Page.loadEventFired")  # none for a move within the same page (#anchor)
        self.send("Runtime.evaluate", session=True, expression="new Promise(r => setTimeout(r, 200))", awaitPromise=True)
        problems = []
        for m in self.events:
            meth, p = m.get("method"), m.get("params", {})
            if meth == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                problems.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif meth == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                problems.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif meth == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]; problems.append(f"log: {e.get('text')} {e.get('url', '')}")
            elif meth == "Network.requestWillBeSent":
                u = p.get("request", {}).get("url", "")
                if not re.match(r"(file|data|about|blob|chrome[\w-]*):", u): problems.append(f"network request: {u}")
            elif meth == "Network.loadingFailed" and not p.get("canceled"):
                problems.append(f"failed request: {p.get('errorText')}")
        return problems

    def js(self, expr):
        r = self.send("Runtime.evaluate", session=True, expression=expr, returnByValue=True)
        if "exceptionDetails" in r: raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def screenshot(self, path):
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", session=True, format="png")["data"]))

    def close(self):
        try: self.send("Browser.close", timeout=10)
        except Exception: pass
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        for fd in (self._r, self._w): os.close(fd)
