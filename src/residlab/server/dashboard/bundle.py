"""The dashboard's ES modules as one classic script, for the static export.

Browsers refuse to load ES modules from ``file://``, so an exported dashboard cannot use the
page's modules as they are. The page keeps its modules within a small, checkable subset
(``dash_common``): one-line relative imports of named bindings, exports only as
``export function|async function|const|class NAME``. Within that subset the transform is
line-local and safe: each module's body runs in its own function scope, in dependency order
(imports before importers), its imports become ``const`` bindings read from the exporting
module's exports object, and its ``export`` keywords are dropped with the names collected into
the object it returns. Because exported bindings are never reassigned (``export let`` is
refused), copying them keeps the meaning of live ES bindings.

Anything outside the subset raises :class:`~residlab.errors.UsageError` naming the file and
line, so a page change that would break the export fails the export (and its test), not the
user's browser. The checks run on a copy of the source in which strings, comments, regular
expressions and template text are blanked out, so ``"export let"`` in a string is not code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from residlab.errors import NotFound, UsageError

__all__ = ["Module", "bundle_modules", "read_module"]

_NAME = r"[A-Za-z_$][\w$]*"
_IMPORT = re.compile(r"^import\s*\{(?P<names>[^{}]*)\}\s*from\s*(?P<q>[\"'])\./"
                     r"(?P<file>[\w.-]+\.js)(?P=q)\s*;?\s*(//.*)?$")
_IMPORT_NAME = re.compile(rf"^(?P<name>{_NAME})(\s+as\s+(?P<alias>{_NAME}))?$")
_EXPORT = re.compile(rf"^export\s+(?P<kind>async\s+function|function|const|class)\s+"
                     rf"(?P<name>{_NAME})\b")
_KEYWORD = re.compile(r"(?<![\w$.])(?P<word>import|export|await)(?![\w$])")
_EXPORT_FORM = "export only as 'export function|async function|const|class NAME'"
_IMPORT_FORM = "import only as 'import { a, b as c } from \"./x.js\";' on one line"
_FORBIDDEN_EXPORTS = (
    (re.compile(r"^export\s+let\b"), "'export let' is not allowed (an exported binding that "
     "is reassigned does not stay live in the static export); export a const or a function"),
    (re.compile(r"^export\s+var\b"), "'export var' is not allowed; export a const or a "
     "function"),
    (re.compile(r"^export\s+default\b"), "default exports are not allowed; " + _EXPORT_FORM),
    (re.compile(r"^export\s*[{*]"), "export lists and re-exports are not allowed; "
     + _EXPORT_FORM),
)
# The character before a "/" that starts a regular expression rather than a division.
_REGEX_AFTER = set("(,=:[!&|?{};+-*%<>~^")
_REGEX_AFTER_WORDS = {"return", "typeof", "case", "do", "else", "in", "of", "new", "delete",
                      "void", "throw", "instanceof", "yield", "await"}


@dataclass(frozen=True)
class Import:
    """``import { name as alias } from "./file"`` at ``line`` of the importing module."""

    file: str
    names: tuple[tuple[str, str], ...]  # (exported name, local name)
    line: int


@dataclass(frozen=True)
class Module:
    """One checked module: its lines (imports and ``export`` keywords still in), what it
    imports and what it exports."""

    name: str
    lines: tuple[str, ...]
    imports: tuple[Import, ...]
    exports: tuple[str, ...]


def _fail(name: str, line: int, problem: str) -> UsageError:
    return UsageError(f"{name}:{line}: {problem}")


# --- blanking: code stays, everything that is text becomes spaces -------------------------

def _previous_word(out: list[str]) -> str:
    """The identifier just before the end of ``out`` (whitespace skipped), or ''."""
    text = "".join(out[-40:]).rstrip()
    match = re.search(r"[\w$]+$", text)
    return match.group(0) if match else ""


def _starts_regex(out: list[str]) -> bool:
    """Whether a ``/`` here starts a regular expression (the usual heuristic: after an
    operator, an opening bracket, a keyword, or at the start)."""
    text = "".join(out[-40:]).rstrip()
    if not text:
        return True
    return text[-1] in _REGEX_AFTER or _previous_word(out) in _REGEX_AFTER_WORDS


def _skip_quoted(source: str, i: int, quote: str, out: list[str]) -> int:
    """Blank a string, template chunk or regular expression body from ``i`` (just after its
    opening ``quote``) to its close; return the index after the close (or where a template
    substitution ``${`` starts)."""
    in_class = False
    while i < len(source):
        char = source[i]
        if char == "\\":  # an escape: blank it and the character it escapes
            out.append(re.sub(r"[^\n]", " ", source[i:i + 2]))
            i += 2
            continue
        if quote == "`" and source.startswith("${", i):
            out.append("${")
            return i + 2
        if quote == "/" and char in "[]":
            in_class = char == "["
        elif char == quote and not in_class:
            out.append(char)
            return i + 1
        elif char == "\n" and quote != "`":
            return i  # unterminated: leave it to the browser's own error
        out.append("\n" if char == "\n" else " ")
        i += 1
    return i


def blank_text(source: str) -> str:
    """``source`` with the insides of comments, strings, template text and regular
    expressions replaced by spaces (newlines kept, so lines and columns stay put)."""
    out: list[str] = []
    braces: list[int] = []  # open-brace depths at which a template substitution started
    depth, i = 0, 0
    while i < len(source):
        char = source[i]
        if source.startswith("//", i):
            end = source.find("\n", i)
            end = len(source) if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif source.startswith("/*", i):
            end = source.find("*/", i + 2)
            end = len(source) if end < 0 else end + 2
            out.append(re.sub(r"[^\n]", " ", source[i:end]))
            i = end
        elif char in "'\"`" or (char == "/" and _starts_regex(out)):
            out.append(char)
            i = _skip_quoted(source, i + 1, char, out)
        elif char == "}" and braces and braces[-1] == depth:
            braces.pop()
            out.append("}")
            i = _skip_quoted(source, i + 1, "`", out)
        else:
            depth += {"{": 1, "}": -1}.get(char, 0)
            out.append(char)
            i += 1
        if out and out[-1] == "${":
            braces.append(depth)
    return "".join(out)


# --- one module: checked, its imports and exports -----------------------------------------

def _import(name: str, number: int, line: str) -> Import:
    """The parsed one-line import at ``line`` (already known to start with ``import``)."""
    match = _IMPORT.match(line.strip())
    if match is None:
        raise _fail(name, number, _IMPORT_FORM)
    names: list[tuple[str, str]] = []
    for part in match["names"].split(","):
        if not part.strip():
            continue
        spec = _IMPORT_NAME.match(part.strip())
        if spec is None:
            raise _fail(name, number, f"cannot read {part.strip()!r}; {_IMPORT_FORM}")
        names.append((spec["name"], spec["alias"] or spec["name"]))
    return Import(match["file"], tuple(names), number)


def _export(name: str, number: int, line: str) -> str:
    """The name a top-level ``export`` line declares, or the error for a form we refuse."""
    stripped = line.strip()
    for pattern, problem in _FORBIDDEN_EXPORTS:
        if pattern.match(stripped):
            raise _fail(name, number, problem)
    match = _EXPORT.match(stripped)
    if match is None:
        raise _fail(name, number, _EXPORT_FORM)
    return match["name"]


def _misplaced(word: str, after: str) -> str:
    """Why ``word`` cannot stand where it was found (not a top-level statement of its own)."""
    if word == "await":
        return "top-level await is not allowed; move it into an async function"
    if word == "import" and after.lstrip().startswith("("):
        return "dynamic import() is not allowed; " + _IMPORT_FORM
    if word == "import" and after.lstrip().startswith("."):
        return "import.meta is not allowed (it does not exist in the static export)"
    return (_IMPORT_FORM if word == "import" else _EXPORT_FORM) + ", as a top-level statement"


def _statements(name: str, source: str) -> tuple[list[Import], list[str]]:
    """Every ``import``/``export``/``await`` of ``source`` checked against the rules; returns
    the imports and the exported names."""
    imports: list[Import] = []
    exports: list[str] = []
    depth = 0
    for number, (code, line) in enumerate(zip(blank_text(source).split("\n"),
                                              source.split("\n"), strict=True), start=1):
        for match in _KEYWORD.finditer(code):
            word, here = match["word"], match.start()
            if code[match.end():].lstrip().startswith(":"):
                continue  # a property name ({ import: x }) or a label
            level = depth + code[:here].count("{") - code[:here].count("}")
            top = level == 0 and not code[:here].strip()
            if word == "import" and top and code[match.end():].lstrip()[:1] not in ("(", "."):
                imports.append(_import(name, number, line))
            elif word == "export" and top:
                exports.append(_export(name, number, line))
            elif word != "await" or level == 0:
                raise _fail(name, number, _misplaced(word, code[match.end():]))
        depth += code.count("{") - code.count("}")
    return imports, exports


def _check_names(module: Module) -> None:
    """Each local name bound once by the imports, each export declared once."""
    seen: dict[str, int] = {}
    for item in module.imports:
        for _, local in item.names:
            if local in seen:
                raise _fail(module.name, item.line, f"{local!r} is imported twice (line "
                            f"{seen[local]} and here); import each name once")
            seen[local] = item.line
    doubled = sorted({n for n in module.exports if module.exports.count(n) > 1})
    if doubled:
        raise UsageError(f"{module.name}: {', '.join(doubled)} exported more than once")


def read_module(static_dir: Path, name: str) -> Module:
    """``static_dir/name`` read and checked (a regular file directly in ``static_dir``)."""
    path = Path(static_dir) / name
    if "/" in name or "\\" in name or path.is_symlink() or not path.is_file():
        raise NotFound(f"no module {name!r} in {static_dir}; the page imports only files "
                       "directly in its static folder")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    imports, exports = _statements(name, source)
    module = Module(name, tuple(source.split("\n")), tuple(imports), tuple(exports))
    _check_names(module)
    return module


# --- the module graph and the bundle --------------------------------------------------------

def _ordered(static_dir: Path, entry: str) -> list[Module]:
    """The modules reachable from ``entry``, every module after the modules it imports; an
    import cycle is an error naming the import that closes it."""
    done: dict[str, Module] = {}
    ordered: list[Module] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        module = read_module(static_dir, name)
        for item in module.imports:
            if item.file in path or item.file == name:
                cycle = " -> ".join([*path[path.index(item.file):], name, item.file]
                                    if item.file in path else [name, item.file])
                raise _fail(name, item.line, f"import cycle {cycle}; the static export needs "
                            "modules that import each other in one direction only")
            if item.file not in done:
                try:
                    visit(item.file, (*path, name))
                except NotFound as error:
                    raise _fail(name, item.line, str(error)) from None
            _check_imported(done[item.file], name, item)
        done[name] = module
        ordered.append(module)

    visit(entry, ())
    return ordered


def _check_imported(source: Module, importer: str, item: Import) -> None:
    for exported, _ in item.names:
        if exported not in source.exports:
            raise _fail(importer, item.line, f"{source.name} does not export {exported!r} "
                        f"(it exports: {', '.join(source.exports) or 'nothing'})")


def _registry(name: str) -> str:
    return f"__residlabModules[{json.dumps(name)}]"


def _module_function(module: Module) -> list[str]:
    """``module`` as a function run once, returning its exports object."""
    imported = {item.line for item in module.imports}
    export_lines = re.compile(r"^(\s*)export\s+")
    body = ["" if number in imported else export_lines.sub(r"\1", line)
            for number, line in enumerate(module.lines, start=1)]
    bindings = [f"const {{ {', '.join(n if n == a else f'{n}: {a}' for n, a in item.names)} }}"
                f" = {_registry(item.file)};" for item in module.imports if item.names]
    return [f"// ---- {module.name} ----",
            f"{_registry(module.name)} = (function () {{", *bindings, *body,
            f"return Object.freeze({{ {', '.join(module.exports)} }});", "})();", ""]


def bundle_modules(static_dir: Path, entry: str) -> str:
    """The ES modules reachable from ``static_dir/entry`` as one classic script (see the
    module docstring for the subset of module syntax this accepts)."""
    lines = [f"// {entry} and the modules it imports, as one classic script for a page opened",
             "// from file:// (generated by residlab.server.dashboard.bundle; edit the modules).",
             "(function () {", '"use strict";',
             "const __residlabModules = Object.create(null);", ""]
    for module in _ordered(Path(static_dir), entry):
        lines.extend(_module_function(module))
    lines.append("})();")
    return "\n".join(lines) + "\n"
