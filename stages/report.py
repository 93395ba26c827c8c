"""DVC stage `report`: the run's report, for people, from the other stages' outputs.

`data/report/report.html` is self-contained (images inlined, no script): it opens offline. `report.md`
(with `figures/`) reads on GitHub. Each section says in one line how to read it.
"""

from __future__ import annotations

import sys

from synthmed.core.stage import Stage, run_stage
from synthmed.report import write_report
from synthmed.report_sections import sections


def main(stage: Stage) -> None:
    for key in stage.inputs:  # every section's input, or one line naming what to run
        stage.dep(key)
    parts = sections(stage.dep)
    subtitle = ("Every figure comes from this run's DVC outputs (`dvc exp show` has them as columns); "
                "docs/metrics.md says what each one means.")
    write_report(str(stage.out), "synthmed run report", subtitle, parts)
    print(f"report: {len(parts)} sections -> {stage.out}/report.html, {stage.out}/report.md")


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, None, argv)


if __name__ == "__main__":
    sys.exit(cli())
