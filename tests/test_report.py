"""The report's fine-tuning comparison: when the offline-to-online agent reaches SAC's final return;
and docs/results.md made from the sweeps' kept records."""

from pathlib import Path

import pytest

from cqlsac.pipeline.config import ConfigError
from cqlsac.pipeline.report import finetune_comparison, steps_to_reach
from cqlsac.pipeline.sweep import load_record
from cqlsac.pipeline.sweep_report import RECORDS, results_sections, section, write_results

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def test_steps_to_reach_first_evaluation_at_or_above_level():
    evals = [(0, -900.0), (1000, -300.0), (2000, -150.0), (3000, -160.0)]
    assert steps_to_reach(evals, -150.0) == 2000
    assert steps_to_reach(evals, -300.5) == 1000
    assert steps_to_reach(evals, -100.0) is None


def test_finetune_comparison_fraction_of_the_sac_budget():
    evals = [(0, -400.0), (1000, -200.0), (2000, -140.0), (4000, -130.0)]
    baseline = [(0, -1300.0), (1000, -1200.0), (2000, -600.0), (4000, -180.0)]
    assert finetune_comparison(evals, baseline) == {
        "sac_final_return": -180.0, "sac_frames": 4000, "finetune_steps_to_sac_final": 2000,
        "finetune_step_fraction": 0.5, "finetune_step_fraction_trivial": False}


def test_finetune_comparison_never_reached_and_no_baseline():
    never = finetune_comparison([(0, -900.0), (1000, -800.0)], [(1000, -700.0)])
    assert never["finetune_steps_to_sac_final"] is None and never["finetune_step_fraction"] is None
    assert finetune_comparison([(0, -900.0)], None) == {}


def test_a_fraction_of_zero_is_flagged_trivial():
    out = finetune_comparison([(0, -150.0), (1000, -140.0)], [(0, -1200.0), (1000, -160.0)])
    assert out["finetune_step_fraction"] == 0.0 and out["finetune_step_fraction_trivial"] is True


def test_finetune_comparison_near_level_between_random_and_sac_final():
    # Random -1000, SAC final -100: the near level is -1000 + 0.95 * 900 = -145.
    out = finetune_comparison([(0, -300.0), (1000, -140.0), (2000, -101.0)], [(2000, -500.0), (4000, -100.0)],
                              random_return=-1000.0)
    assert out["finetune_steps_to_sac_final"] is None and out["finetune_step_fraction"] is None
    assert out["finetune_steps_to_sac_final_near"] == 1000
    assert out["finetune_step_fraction_near"] == 0.25


def test_the_run_report_says_how_the_final_policy_acted():
    from cqlsac.pipeline.report import result_rows

    summary = load_record(RESULTS.parent / RECORDS / "20261202-122424-180d87.json")["runs"][0]["summary"]
    assert "the fine-tuned policy, deterministic, mean of 10" in result_rows(summary)[0][1]
    sampled = result_rows({**summary, "final_eval_sampled": True})[0][1]
    assert "the fine-tuned policy, with sampled actions, mean of 10" in sampled


def test_the_dip_is_the_fall_below_the_starting_offline_policy_over_the_reference_range():
    from cqlsac.pipeline.sweep_report import dip

    # Starts at 50 (the offline policy), falls to -70 at worst, recovers; range 300 - (-100) = 400.
    summary = {"finetune_evals": [(0, 50.0), (1000, -20.0), (2000, -70.0), (3000, 200.0)],
               "ref_min_score": -100.0, "ref_max_score": 300.0, "offline_eval_return": 51.0}
    assert dip(summary) == pytest.approx(0.3)
    assert dip({**summary, "finetune_evals": [(0, 50.0), (1000, 60.0), (2000, 55.0)]}) == 0.0  # never below the start
    assert dip({**summary, "offline_eval_return": None}) is None  # a fresh agent: no switch, no dip
    assert dip({**summary, "ref_max_score": None}) is None
    assert dip({**summary, "finetune_evals": [(0, 50.0)]}) is None


def test_returns_along_the_budget_and_the_censored_step_fraction():
    from cqlsac.pipeline.sweep_report import at_budget_share, steps_to_sac_final

    evals = [(0, -500.0), (1000, -300.0), (2000, -200.0), (3000, -180.0), (4000, -150.0)]
    assert at_budget_share(0.25)({"finetune_evals": evals}) == -300.0  # nearest to 1000 of 4000 frames
    assert at_budget_share(0.5)({"finetune_evals": evals}) == -200.0
    assert at_budget_share(0.5)({}) is None
    reached = {"finetune_evals": evals, "finetune_step_fraction": 0.25, "sac_frames": 8000}
    assert steps_to_sac_final(reached) == 0.25
    # Never reached: the whole budget plus one evaluation interval, (4000 + 1000) / 8000.
    assert steps_to_sac_final({**reached, "finetune_step_fraction": None}) == 0.625
    assert steps_to_sac_final({"finetune_evals": evals}) is None  # no SAC from scratch to compare with


def test_a_recipes_compute_counts_its_own_stages_computed_or_reused():
    from cqlsac.pipeline.sweep_report import compute_minutes, recipe_minutes

    shared = {"dataset": 20.0, "baseline": 150.0, "evaluate": 1.0}
    reused = {"stage_seconds": {"evaluate": 1.0},  # offline and fine-tuning came from the cache
              "stage_compute_seconds": {**shared, "offline": 300.0, "finetune": 90.0}}
    assert recipe_minutes(reused) == 6.5 and compute_minutes(reused) == 1 / 60
    assert recipe_minutes({"stage_compute_seconds": {**shared, "finetune": 120.0}}) == 2.0  # no offline stage
    assert recipe_minutes({"stage_compute_seconds": shared}) is None


def test_the_sweep_report_lists_each_runs_numbers():
    from cqlsac.pipeline.sweep_report import run_table

    record = {"spec": {"named": {}}, "runs": [
        {"setting": 0, "seed": 0, "overrides": {}, "status": "finished",
         "summary": {"final_eval_return": -139.59148, "sac_final_return": -375.847}},
        {"setting": 0, "seed": 1, "overrides": {}, "status": "failed", "summary": None}]}
    assert run_table(record) == ["**each run** (returns to 4 decimals)", "", "| setting | seed | final | SAC from scratch |",
                                 "|---|---|---|---|", "| base config | 0 | -139.5915 | -375.8470 |", ""]


def test_the_episode_table_bounds_the_ratio_where_one_never_reached_the_level():
    from cqlsac.pipeline.sweep_report import episode_table

    def run(seed, ours, sac, ours_total, sac_total):
        ratio = None if ours is None or sac is None else ours / sac
        return {"setting": 0, "seed": seed, "overrides": {}, "status": "finished", "summary": {
            "episode_return_level": 200.0, "episode_window": 20, "finetune_episodes_to_level": ours,
            "sac_episodes_to_level": sac, "episode_ratio": ratio, "finetune_episodes": ours_total,
            "sac_episodes": sac_total}}

    # Per seed: 50/200 at most (SAC never in 200); 30/120 exactly; 100/80 at least (fine-tuning never in 100).
    record = {"spec": {"named": {}}, "runs": [run(0, 50, None, 100, 200), run(1, 30, 120, 100, 300),
                                              run(2, None, 80, 100, 160)]}
    row = episode_table(record)[4]
    # Lower bounds 0, 0.25, 1.25: median 0.25; upper bounds 0.25, 0.25, inf: median 0.25.
    assert row == ("| base config | 3 | 50, 30, never | never, 120, 80 | 0.2 (one run) | "
                   "at most 0.25, 0.25, at least 1.25 | 0.25 |")
    record["runs"].append(run(3, None, None, 100, 150))  # neither reached it: 0 to infinity
    # Lower bounds 0, 0, 0.25, 1.25: median 0.125; upper 0.25, 0.25, inf, inf: median inf.
    assert episode_table(record)[4].endswith("| at most 0.25, 0.25, at least 1.25, unknown | 0.12 to no upper bound |")
    record["runs"][3] = run(3, 20, None, 100, 400)  # only fine-tuning: at most 20/400
    # Lower bounds 0, 0.25, 1.25, 0: median 0.125; upper 0.25, 0.25, inf, 0.05: median 0.25.
    assert episode_table(record)[4].endswith("| at most 0.25, 0.25, at least 1.25, at most 0.05 | 0.12 to 0.25 |")


def test_every_results_section_is_what_its_kept_record_makes():
    sections = results_sections(RESULTS.read_text())
    records = sorted((RESULTS.parent / RECORDS).glob("*.json"))
    assert {record.stem for record in records} <= set(sections)
    for record in records:
        assert sections[record.stem] == section(record.stem, load_record(record)), record.stem
    for name, text in sections.items():  # sections from before records were kept say so
        assert (RESULTS.parent / RECORDS / f"{name}.json").is_file() or "\nRecord: not kept (" in text, name


def test_the_contents_link_each_section_by_githubs_anchor_and_tell_repeats_apart():
    from cqlsac.pipeline.sweep_report import contents

    ran = "Ran 2026-12-02 15:16:42 UTC on AMD EPYC (2 cores), local backend"
    sections = {"a": f"<!-- sweep a -->\n## The seed's claim, v3 (x)\n\n{ran}\n",
                "b": f"<!-- sweep b -->\n## The seed's claim, v3 (x)\n\n**Incomplete: 6 of 25 runs finished.** T\n\n{ran}\n",
                "c": "<!-- sweep c -->\n## Other_one\n\nno date here\n"}
    assert contents(sections) == [
        "- [The seed's claim, v3 (x)](#the-seeds-claim-v3-x), ran 2026-12-02 on AMD EPYC",
        "- [The seed's claim, v3 (x)](#the-seeds-claim-v3-x-1), ran 2026-12-02 on AMD EPYC (incomplete: 6 of 25 runs)",
        "- [Other_one](#other_one)"]
    page = RESULTS.read_text()
    assert "\n".join(contents(results_sections(page))) in page.split("<!-- sweep ", 1)[0]


def test_a_page_without_generated_sections_is_left_alone(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# My notes\n\nkeep me\n")
    with pytest.raises(ConfigError, match="no generated sections"):
        write_results([tmp_path / "a-sweep"], page)
    assert page.read_text() == "# My notes\n\nkeep me\n" and not (tmp_path / RECORDS).exists()


def test_a_results_page_is_written_only_once_every_part_of_it_can_be_and_keeps_every_section(tmp_path, monkeypatch):
    import json

    from cqlsac.pipeline import sweep_report

    # The page's bookkeeping, not its statistics (tested above): a section and a curve made at once.
    monkeypatch.setattr(sweep_report, "section", lambda name, record: f"<!-- sweep {name} -->\n## {name}\n")
    monkeypatch.setattr(sweep_report, "plot", lambda record, path: path.write_text("png"))
    kept = sorted((RESULTS.parent / RECORDS).glob("*.json"))[0].read_text()
    one, spaced = tmp_path / "one.json", tmp_path / "a b.json"  # a sweep's name is its folder's, spaces and all
    one.write_text(kept)
    spaced.write_text(kept)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    (page.parent / "img").write_text("a file where the curves go")
    with pytest.raises(ConfigError, match="img is a file"):
        write_results([one, spaced], page)
    assert sorted(p.name for p in page.parent.iterdir()) == ["img"]  # no record kept, no page
    (page.parent / "img").unlink()
    (page.parent / "img").mkdir()
    write_results([spaced, one], page)
    both = results_sections(page.read_text())
    write_results([one], page)  # the other sweep's section stays
    assert json.loads((page.parent / RECORDS / "a b.json").read_text()) == json.loads(kept)
    assert results_sections(page.read_text()) == both and set(both) == {"a b", "one"}
