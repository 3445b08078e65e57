"""A child's output (Flower colours its log levels even into a pipe) reaches log files and non-terminal consoles
without escape codes; a terminal keeps its colours."""

import io
import os
import sys

from pollinate.deploy.processes import ChildProcess, plain_line

COLOURED = "\x1b[92mINFO \x1b[0m:      Starting Flower SuperLink"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_child(tmp_path, echo):
    child = ChildProcess("superlink", [sys.executable, "-c", f"print({COLOURED!r})"], dict(os.environ),
                         tmp_path / "superlink.log", echo=echo)
    assert child.wait(timeout=30) == 0
    return (tmp_path / "superlink.log").read_text()


def test_log_files_and_piped_consoles_get_plain_lines(tmp_path):
    echo = io.StringIO()
    assert run_child(tmp_path, echo) == "INFO :      Starting Flower SuperLink\n"
    assert echo.getvalue() == "[superlink] INFO :      Starting Flower SuperLink\n"


def test_a_terminal_keeps_the_colours(tmp_path):
    echo = Terminal()
    run_child(tmp_path, echo)
    assert echo.getvalue() == f"[superlink] {COLOURED}\n"
    assert plain_line("\x1b[?25l\x1b[1;31mx\x1b[0m") == "x"
