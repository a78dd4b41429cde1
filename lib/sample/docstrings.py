"""A corpus of the Python standard library's own docstrings: real English text, on every machine.

The text is the docstrings (`inspect.getdoc`) of the modules below, their submodules and their
public classes, functions and methods, as this interpreter ships them: it is part of CPython's
source, under the Python Software Foundation License. Each documented object gives one row:

- `text`: its dotted name and signature, then its docstring past the summary line;
- `target`: the summary line (the docstring's first line).

A summary is what `configs/default.yaml` asks the sample T5 for ("summarize: " + text), and
the rows' text is what the sample GPT-2 continues. `held_out` puts each module in one of two
parts by a hash of its name, so the default job scores text from modules the models never saw.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Plain modules, and packages whose submodules are walked too; nothing with side effects on
# import (no `this`, `antigravity`, `turtle`, GUI or test packages).
MODULES = """abc argparse ast base64 bisect calendar cmath codecs configparser contextlib copy csv
dataclasses datetime decimal difflib dis enum fileinput fnmatch fractions ftplib functools
getopt gettext glob gzip hashlib heapq hmac imaplib inspect io ipaddress itertools locale lzma
mailbox math mimetypes netrc numbers operator optparse os pathlib pickle platform plistlib poplib
pprint queue random re reprlib sched secrets selectors shelve shlex shutil smtplib socket
socketserver ssl statistics string struct subprocess sysconfig tarfile tempfile textwrap
threading timeit tokenize traceback types typing uuid warnings weakref zipfile""".split()
PACKAGES = """asyncio collections concurrent email html http importlib json logging
multiprocessing sqlite3 unittest urllib wsgiref xml xmlrpc zoneinfo""".split()
HELD_OUT = 0.2  # the share of modules the models never see


@dataclass(frozen=True)
class Doc:
    """One documented object."""

    module: str
    name: str
    text: str
    target: str


def module_names() -> list[str]:
    """The modules the corpus reads, sorted; packages with their public submodules."""
    names = set(MODULES)
    for root in PACKAGES:
        names.add(root)
        package = importlib.import_module(root)
        for info in pkgutil.walk_packages(package.__path__, root + "."):
            parts = info.name.split(".")[1:]
            if not any(p.startswith("_") or p in ("test", "tests") for p in parts):
                names.add(info.name)
    return sorted(names)


def held_out(module: str) -> bool:
    """Whether a module's rows are held out from training (a hash of its name)."""
    digest = hashlib.sha256(module.encode()).digest()
    return int.from_bytes(digest[:4], "big") < HELD_OUT * 2**32


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _doc(module: str, name: str, obj: object) -> Doc | None:
    """The row of one object, None when its docstring has no summary line to target."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    summary, _, rest = doc.partition("\n")
    summary = summary.strip()
    if len(summary.split()) < 2:
        return None
    head = f"{name}{_signature(obj) if callable(obj) else ''}"
    text = f"{head}: {' '.join(rest.split())}" if rest.strip() else head
    return Doc(module, name, text, summary)


def _documented(module) -> list[tuple[str, object]]:
    """The module, and its public classes, functions and methods defined in it."""
    found = [(module.__name__, module)]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            found.append((f"{module.__name__}.{attr}", obj))
            for method, value in sorted(vars(obj).items()):
                if not method.startswith("_") and inspect.isfunction(value):
                    found.append((f"{module.__name__}.{attr}.{method}", value))
        elif inspect.isfunction(obj):
            found.append((f"{module.__name__}.{attr}", obj))
    return found


def collect() -> list[Doc]:
    """Every documented object's row, modules in sorted order, each docstring once."""
    rows, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules still document themselves
        for name in module_names():
            try:
                module = importlib.import_module(name)
            except Exception:  # absent from this build (e.g. no _ssl), or refuses to import
                continue
            for qualified, obj in _documented(module):
                doc = _doc(name, qualified, obj)
                if doc is not None and (doc.text, doc.target) not in seen:
                    seen.add((doc.text, doc.target))
                    rows.append(doc)
    return rows


def write_corpus(path: str | Path, docs: list[Doc]) -> Path:
    """The rows as Parquet: `doc_id` (the object's name), `text`, `target`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "doc_id": [doc.name for doc in docs],
            "text": [doc.text for doc in docs],
            "target": [doc.target for doc in docs],
        }
    )
    pq.write_table(table, path, row_group_size=500)
    return path
