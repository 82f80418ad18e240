"""keyslot-trace(1) in troff, generated from the click commands, so that the manual
says what --help says and cannot drift from it (`keyslot-trace man`)."""

from __future__ import annotations

import inspect

import click

ENVIRONMENT = (
    ("NO_COLOR", "When set (to anything but the empty string), no colour: bold and reverse video remain."),
    ("_KEYSLOT_TRACE_COMPLETE",
     "Shell completion, click's: eval \"$(_KEYSLOT_TRACE_COMPLETE=bash_source keyslot-trace)\" in ~/.bashrc "
     "(zsh_source in ~/.zshrc; fish_source for fish)."),
)


def manpage(cli: click.Group, name: str, version: str) -> str:
    ctx = click.Context(cli, info_name=name)
    summary, _, rest = (cli.help or "").partition("\n")
    out = [f'.TH "{name.upper()}" 1 "" "{name} {version}" "User Commands"',
           ".SH NAME", f"{_esc(name)} \\- {_esc(summary.strip().rstrip('.'))}", ".SH SYNOPSIS"]
    commands = [(n, c) for n, c in cli.commands.items() if not c.hidden]
    for n, c in commands:
        usage = " ".join(c.collect_usage_pieces(click.Context(c, info_name=n, parent=ctx)))
        out += [f".B {_esc(name)} {n}", _esc(usage), ".br"]
    out += [".SH DESCRIPTION", *_paragraphs(rest), ".SH COMMANDS"]
    for n, c in commands:
        sub = click.Context(c, info_name=n, parent=ctx)
        out += [f".SS {_esc(name)} {n}", *_paragraphs(c.help or "")]
        for p in c.params:
            record = p.get_help_record(sub) if isinstance(p, click.Option) and not p.hidden else None
            if record:
                out += [".TP", f"\\fB{_esc(record[0])}\\fR", _esc(record[1])]
    out.append(".SH ENVIRONMENT")
    for var, text in ENVIRONMENT:
        out += [".TP", f"\\fB{_esc(var)}\\fR", _esc(text)]
    return "\n".join(out) + "\n"


def _paragraphs(text: str) -> list[str]:
    """click's help: paragraphs split by blank lines; one that starts with \\b keeps its lines."""
    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        if para.startswith("\b"):
            out += [".PP", ".nf", *(_esc(x) for x in para.splitlines()[1:]), ".fi"]
        elif para.strip():
            out += [".PP", _esc(" ".join(x.strip() for x in para.splitlines()))]
    return out


def _esc(text: str) -> str:
    """Text as troff reads it: backslashes kept, ASCII hyphens (options are copied and pasted),
    and no line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + x if x.startswith((".", "'")) else x for x in text.split("\n"))
