"""Every metric the dashboards and alert rules query is one Parley declares, and Parley's code names
metrics only through its declarations.

Declarations are the entries of each crate's `declare_metrics!` table in `src/metrics.rs`. A
query may use a histogram's `_bucket`, `_sum` and `_count` series. The queries checked are the
dashboards', the alert rules' and their unit tests', and the series the end-to-end tests read from
`/metrics`. A metric macro (`counter!`, `gauge!`, `histogram!`) given a string literal anywhere else in
`services/`, tests included and however the call is wrapped over lines, is refused, so a typo cannot
quietly start a new series that no dashboard reads.

    python check-metric-names.py
"""

import glob
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DECLARATION = re.compile(r'^\s*(?:counter|gauge|histogram) [A-Z0-9_]+ = "(parley_[a-z0-9_]+)"', re.MULTILINE)
USE = re.compile(r"\bparley_[a-z0-9_]+")
# A series an end-to-end test reads: `t.metric("parley_...")`, or through a `format!`.
TEST_READ = re.compile(r'\.metric\(\s*&?(?:format!\(\s*)?"(parley_[a-z0-9_]+)')
LITERAL_MACRO = re.compile(r'\b(counter|gauge|histogram)!\(\s*"')
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def declared():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "services", "*", "src", "metrics.rs")):
        names.update(DECLARATION.findall(open(path).read()))
    return names


def queried():
    used = {}
    sources = glob.glob(os.path.join(ROOT, "charts", "parley", "dashboards", "*.json"))
    sources += glob.glob(os.path.join(ROOT, "charts", "parley", "rules", "*.yaml"))
    for path in sources:
        for name in USE.findall(open(path).read()):
            used.setdefault(name, os.path.relpath(path, ROOT))
    for path in glob.glob(os.path.join(ROOT, "services", "*", "tests", "**", "*.rs"), recursive=True):
        for name in TEST_READ.findall(open(path).read()):
            used.setdefault(name, os.path.relpath(path, ROOT))
    return used


def known(name, names):
    if name in names:
        return True
    return any(name.endswith(suffix) and name[: -len(suffix)] in names for suffix in HISTOGRAM_SERIES)


def main():
    names = declared()
    if not names:
        print("error: no metric declarations found in services/*/src/metrics.rs", file=sys.stderr)
        return 1
    problems = []
    for name, where in sorted(queried().items()):
        if not known(name, names):
            problems.append(f"{where} queries {name}, which no services/*/src/metrics.rs declares")
    for path in glob.glob(os.path.join(ROOT, "services", "**", "*.rs"), recursive=True):
        if path.endswith(os.sep + "metrics.rs"):
            continue
        text = open(path).read()
        for found in LITERAL_MACRO.finditer(text):
            number = text.count("\n", 0, found.start()) + 1
            problems.append(f"{os.path.relpath(path, ROOT)}:{number} names a metric by a literal; declare it in metrics.rs")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{len(names)} metrics declared; every dashboard and alert query names one of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
