#!/usr/bin/env python3
"""Summarize a kosoku (Autobahn|Testsuite) fuzzingclient report directory.

    python3 tests/conformance/summarize.py REPORT_DIR [--expect-cases N]

Reads REPORT_DIR/index.json (Autobahn format: {agent: {case_id: entry}}) and
the per-case JSON files it points to, prints the count of cases per verdict,
lists every case whose verdict is not OK, writes that list to
REPORT_DIR/non_ok.tsv, and ends with a line "conformance: N passed, N failed,
N skipped".

A case fails when
  - its behavior is anything but OK, NON-STRICT, INFORMATIONAL or UNIMPLEMENTED
    (that is FAILED, or ERROR: the case could not be run), or
  - its closing behavior is anything but OK or INFORMATIONAL (WRONG CODE,
    FAILED BY CLIENT, UNCLEAN, FAILED).
This is kosoku's own pass criterion, except that UNIMPLEMENTED is accepted
and counted as skipped: it is what the permessage-deflate cases (12.*, 13.*)
report against a server that does not negotiate compression.

Exit status: 0 when no case failed, 1 when a case failed, 2 when the report is
missing, unreadable, empty, or has fewer cases than --expect-cases.
"""

from __future__ import annotations

import argparse
import collections
import html
import json
import os
import re
import sys

PASS_BEHAVIORS = ("OK", "NON-STRICT", "INFORMATIONAL")
SKIP_BEHAVIORS = ("UNIMPLEMENTED",)
PASS_CLOSE = ("OK", "INFORMATIONAL")
COMPRESSION_MAJORS = ("12", "13")


def sort_key(case_id: str) -> list[int]:
    return [int(p) if p.isdigit() else 0 for p in case_id.split(".")]


def plain(text: str | None, limit: int = 0) -> str:
    text = re.sub(r"<br\s*/?>", " ", text or "")
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    text = " ".join(text.split())
    if limit and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def verdict(entry: dict) -> str:
    if entry["behavior"] in SKIP_BEHAVIORS and entry["behaviorClose"] in PASS_CLOSE:
        return "skipped"
    if entry["behavior"] in PASS_BEHAVIORS and entry["behaviorClose"] in PASS_CLOSE:
        return "passed"
    return "failed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir")
    parser.add_argument("--expect-cases", type=int, default=1,
                        help="fail (exit 2) when the report holds fewer cases")
    args = parser.parse_args()

    index_path = os.path.join(args.report_dir, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        print(f"conformance: no usable report at {index_path}: {err}", file=sys.stderr)
        return 2

    cases: dict[str, dict] = {}
    for agent, entries in index.items():
        for case_id, entry in entries.items():
            cases[case_id] = dict(entry, agent=agent)
    if len(cases) < max(args.expect_cases, 1):
        print(f"conformance: report has {len(cases)} cases, expected at least "
              f"{max(args.expect_cases, 1)}", file=sys.stderr)
        return 2

    ids = sorted(cases, key=sort_key)
    details: dict[str, dict] = {}
    for case_id in ids:
        entry = cases[case_id]
        if entry["behavior"] == "OK" and entry["behaviorClose"] == "OK":
            continue
        try:
            with open(os.path.join(args.report_dir, entry["reportfile"])) as f:
                details[case_id] = json.load(f)
        except (OSError, ValueError):
            details[case_id] = {}

    agents = sorted({c["agent"] for c in cases.values()})
    print(f"Autobahn|Testsuite cases (kosoku fuzzingclient): {len(cases)} cases, "
          f"server agent: {', '.join(repr(a) for a in agents)}")
    print()
    print(f"  {'behavior':<15} {'cases':>5}    {'closing behavior':<17} {'cases':>5}")
    by_behavior = collections.Counter(c["behavior"] for c in cases.values())
    by_close = collections.Counter(c["behaviorClose"] for c in cases.values())
    left = sorted(by_behavior.items(), key=lambda kv: (kv[0] != "OK", kv[0]))
    right = sorted(by_close.items(), key=lambda kv: (kv[0] != "OK", kv[0]))
    for i in range(max(len(left), len(right))):
        lb, lc = left[i] if i < len(left) else ("", "")
        rb, rc = right[i] if i < len(right) else ("", "")
        print(f"  {lb:<15} {lc!s:>5}    {rb:<17} {rc!s:>5}")
    print()

    # Every non-OK case, to the TSV file; on stdout the compression cases are
    # folded into one line per group when they are all plain UNIMPLEMENTED.
    tsv_path = os.path.join(args.report_dir, "non_ok.tsv")
    folded: dict[str, list[str]] = collections.defaultdict(list)
    lines: list[str] = []
    with open(tsv_path, "w") as tsv:
        tsv.write("case\tbehavior\tbehaviorClose\tremoteCloseCode\tverdict\t"
                  "description\tresult\tresultClose\n")
        for case_id in ids:
            if case_id not in details:
                continue
            entry, detail = cases[case_id], details[case_id]
            v = verdict(entry)
            tsv.write("\t".join([
                case_id, entry["behavior"], entry["behaviorClose"],
                str(entry.get("remoteCloseCode")), v,
                plain(detail.get("description")), plain(detail.get("result")),
                plain(detail.get("resultClose")),
            ]) + "\n")
            major = case_id.split(".")[0]
            if major in COMPRESSION_MAJORS and v == "skipped":
                folded[major].append(case_id)
                continue
            mark = "FAIL" if v == "failed" else "    "
            lines.append(
                f"{mark} {case_id:<8} {entry['behavior']:<13} {entry['behaviorClose']:<13} "
                f"close={entry.get('remoteCloseCode')!s:<5} "
                f"{plain(detail.get('description'), 90)}\n"
                f"{'':<14}-> {plain(detail.get('result'), 100)}"
                + ("" if entry["behaviorClose"] == "OK"
                   else f" / {plain(detail.get('resultClose'), 80)}")
            )
    non_ok = len(details)
    print(f"Non-OK cases: {non_ok} (all listed in {tsv_path})")
    for line in lines:
        print("  " + line)
    for major, folded_ids in sorted(folded.items()):
        print(f"       {major}.*     UNIMPLEMENTED (close OK): {len(folded_ids)} cases, "
              f"{folded_ids[0]} .. {folded_ids[-1]}: permessage-deflate was offered by "
              f"the client and not negotiated")
    print()

    counts = collections.Counter(verdict(c) for c in cases.values())
    failed_ids = [i for i in ids if verdict(cases[i]) == "failed"]
    if failed_ids:
        print(f"FAILED cases ({len(failed_ids)}): {' '.join(failed_ids)}")
    print(f"conformance: {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['skipped']} skipped")
    return 1 if failed_ids else 0


if __name__ == "__main__":
    sys.exit(main())
