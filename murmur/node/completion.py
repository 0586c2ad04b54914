"""Shell completion for ``murmur``, generated from its argparse parser.

``murmur completion bash`` prints a bash completion script; ``murmur
completion zsh`` the same behind zsh's ``bashcompinit``. The script is
derived from the parser itself (commands, options, choices, which options
take paths), so a new flag completes without anyone editing a script, and
it runs no Python at completion time: pressing TAB must not wait for an
interpreter.
"""

from __future__ import annotations

import argparse
import enum
import shlex
from dataclasses import dataclass, field

#: Options whose metavar says they take a path complete file names.
PATH_METAVARS = frozenset({"FILE", "DIR", "RUN_DIR", "SCENARIO"})


class Shell(enum.StrEnum):
    BASH = "bash"
    ZSH = "zsh"


@dataclass
class Command:
    """One level of the command tree: its subcommands and options."""

    subcommands: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    path_options: list[str] = field(default_factory=list)
    choices: dict[str, list[str]] = field(default_factory=dict)  # option -> its choices


def command_tree(parser: argparse.ArgumentParser, path: str = "") -> dict[str, Command]:
    """``"node/start"`` -> its :class:`Command`, for ``parser`` and every subparser below it."""
    command = Command()
    tree = {path: command}
    for action in parser._actions:  # argparse has no public walk; completion generators all read this
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                command.subcommands.append(name)
                tree |= command_tree(sub, f"{path}/{name}" if path else name)
            continue
        command.options.extend(action.option_strings)
        if action.option_strings and action.choices:
            for option in action.option_strings:
                command.choices[option] = [str(c) for c in action.choices]
        if action.option_strings and action.metavar in PATH_METAVARS:
            command.path_options.extend(action.option_strings)
    return tree


def _words(items: list[str]) -> str:
    return shlex.quote(" ".join(items))


def bash_script(parser: argparse.ArgumentParser, prog: str) -> str:
    tree = command_tree(parser)
    fn = f"_{prog}".replace("-", "_")
    subs = "\n".join(f"        {shlex.quote(p)}) echo {_words(c.subcommands)} ;;" for p, c in tree.items()
                     if c.subcommands)
    opts = "\n".join(f"        {shlex.quote(p)}) echo {_words(c.options)} ;;" for p, c in tree.items())
    values = "\n".join(
        f"        {shlex.quote(p + '|' + o)}) COMPREPLY=($(compgen -W {_words(ch)} -- \"$cur\")); return ;;"
        for p, c in tree.items() for o, ch in c.choices.items()
    )
    paths = "\n".join(
        f"        {shlex.quote(p + '|' + o)}) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;"
        for p, c in tree.items() for o in c.path_options
    )
    return f"""# {prog} completion for bash: eval "$({prog} completion bash)" (or save it under
# /etc/bash_completion.d/{prog}). Generated from {prog}'s own parser.
{fn}_subcommands() {{
    case "$1" in
{subs}
    esac
}}
{fn}_options() {{
    case "$1" in
{opts}
    esac
}}
{fn}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" i w subs
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        subs=" $({fn}_subcommands "$path") "
        if [[ "$w" != -* && "$subs" == *" $w "* ]]; then path="${{path:+$path/}}$w"; fi
    done
    case "$path|$prev" in
{values}
{paths}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$({fn}_options "$path")" -- "$cur"))
        return
    fi
    subs="$({fn}_subcommands "$path")"
    if [[ -n "$subs" ]]; then
        COMPREPLY=($(compgen -W "$subs" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F {fn} {prog}
"""


def script(shell: Shell, parser: argparse.ArgumentParser, prog: str) -> str:
    text = bash_script(parser, prog)
    if shell is Shell.ZSH:
        return f"# {prog} completion for zsh: eval \"$({prog} completion zsh)\" in ~/.zshrc\n" \
               "autoload -U +X bashcompinit && bashcompinit\n" + text
    return text
