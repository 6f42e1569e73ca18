#!/usr/bin/env python3
"""Drives `demo --interactive` through a pseudo-terminal, as a person at a keyboard would.

Usage: demo_pty_check.py ./build/demo

Three sessions, each on a new pseudo-terminal:
  1. presses Download, Sleep, Save and then Yes, waiting each time until the window shows
     what the key did; then `q`: the demo ends with exit code 0 and its summary;
  2. presses Ctrl-C: the window closes the same way, exit code 0;
  3. sends SIGTERM: the demo dies of it.
After each, the terminal's modes must be what they were before the demo put it in raw mode.
Each wait has a deadline, so a hang fails instead of sticking. Exits 0 when every check
passed; otherwise says which one failed and exits 1.
"""
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

DEADLINE_S = 20.0


def session(demo, scenario):
    master, slave = pty.openpty()
    if hasattr(termios, "tcsetwinsize"):  # Python 3.11; the default size is 0x0 otherwise
        termios.tcsetwinsize(slave, (40, 100))
    before = termios.tcgetattr(slave)
    child = subprocess.Popen([demo, "--interactive"], stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True, close_fds=True)
    seen = b""

    def read_until(text, what):
        nonlocal seen
        end = time.monotonic() + DEADLINE_S
        while text.encode() not in seen:
            left = end - time.monotonic()
            if left <= 0:
                fail(f"{what}: '{text}' did not appear within {DEADLINE_S:.0f} s")
            ready, _, _ = select.select([master], [], [], left)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    fail(f"{what}: the demo ended before '{text}' appeared")

    def fail(why):
        child.kill()
        tail = seen[-2000:].decode(errors="replace")
        print(f"FAIL: {why}\n--- the last output ---\n{tail}")
        sys.exit(1)

    def press(key, expect, what):
        os.write(master, key.encode())
        read_until(expect, what)
        print(f"ok: {what}")

    read_until("keys:", "the window shows its keys")
    print(f"ok: the window shows its keys ({scenario})")
    expected_rc = 0
    if scenario == "keys":
        press("d", "Download: downloading", "d starts Download")
        press("s", "Sleep: sleeping 1.5 s", "s starts Sleep")
        press("v", "dialog: overwrite report.txt?", "v opens the Save dialog")
        press("y", "Save: saved report.txt", "y answers Yes")
        press("q", "closed:", "q closes the window")
        read_until("summary:", "the demo prints its summary")
    elif scenario == "ctrl-c":
        press("s", "Sleep: sleeping 1.5 s", "s starts Sleep")
        press("\x03", "closed:", "Ctrl-C closes the window")
    else:
        child.send_signal(signal.SIGTERM)
        expected_rc = -signal.SIGTERM

    end = time.monotonic() + DEADLINE_S
    while child.poll() is None:  # drain the output so the child never blocks on a full pty
        if time.monotonic() > end:
            fail("the demo did not exit after q")
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                seen += os.read(master, 65536)
            except OSError:
                pass
    if child.returncode != expected_rc:
        fail(f"the demo exited with {child.returncode}, not {expected_rc}")
    print(f"ok: the demo exited with {expected_rc}")
    if scenario == "keys":
        if b"Download      cancelled" not in seen and b"Download      finished" not in seen:
            fail("the summary does not list Download")
        if b"Save          finished" not in seen:
            fail("the summary does not say Save finished")
        print("ok: the summary lists the jobs")
    after = termios.tcgetattr(slave)
    if after != before:
        fail(f"the terminal was not restored: {before} before, {after} after")
    print("ok: the terminal's modes are restored")
    os.close(master)
    os.close(slave)


def main():
    for scenario in ("keys", "ctrl-c", "sigterm"):
        session(sys.argv[1], scenario)
    print("demo --interactive: all checks passed")


if __name__ == "__main__":
    main()
