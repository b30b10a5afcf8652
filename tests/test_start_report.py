"""tools/start_report.py: the start's four targets on hand-written reports, and its exit code."""

import json

import pytest

from tools import start_report


def _reports(vl=75.0, va=50.0, kinds=(90.0, 85.0), wer=0.08):
    by_source = {"demo_colour": {"vl_score": 60.0, "va_score": 40.0, "vl_kind_rate": 100.0, "va_kind_rate": kinds[0]},
                 "demo_yesno": {"vl_score": 90.0, "va_score": 60.0, "vl_kind_rate": 100.0, "va_kind_rate": kinds[1],
                                "vl_yes_rate": 50.0, "va_yes_rate": 70.0}}
    answers = {"vl_score": vl, "va_score": va, "gap": vl - va, "n": 400, "by_source": by_source,
               "by_task": {"yesno": {"vl_yes_rate": 50.0, "va_yes_rate": 70.0}}}
    return answers, {"wer": {"text": 0.01, "audio": wer}, "n": 300}


BOUNDS = {"min_vl": 70.0, "max_wer": 0.10, "min_gap": 15.0, "min_kind": 0.80}


def test_a_start_that_reads_hears_and_has_a_gap_meets_every_target():
    report = start_report.start_report(*_reports(), **BOUNDS)
    assert report["met"] and all(t["met"] for t in report["targets"].values())
    assert report["targets"]["spoken_kind"]["value"] == 85.0  # the worst task decides
    assert report["targets"]["wer"]["value"] == pytest.approx(8.0)
    assert report["yes_share"] == {"typed": 50.0, "spoken": 70.0}
    assert report["tasks"]["demo_yesno"]["va_yes"] == 70.0


@pytest.mark.parametrize("change, missed", [
    ({"vl": 69.9}, "vl"),
    ({"wer": 0.1001}, "wer"),
    ({"va": 60.5}, "gap"),  # 75 - 60.5 = 14.5 < 15
    ({"kinds": (90.0, 79.0)}, "spoken_kind"),  # one task below 80% is enough
])
def test_each_target_is_missed_on_its_own(change, missed):
    report = start_report.start_report(*_reports(**change), **BOUNDS)
    assert not report["met"]
    assert [name for name, t in report["targets"].items() if not t["met"]] == [missed]


def test_the_command_writes_the_report_and_exits_1_on_a_miss(tmp_path, capsys):
    for name, (answers, transcribe) in {"good": _reports(), "deaf": _reports(wer=0.6)}.items():
        (tmp_path / f"{name}_answers.json").write_text(json.dumps(answers))
        (tmp_path / f"{name}_asr.json").write_text(json.dumps(transcribe))
        code = start_report.main(["--answers", str(tmp_path / f"{name}_answers.json"), "--transcribe",
                                  str(tmp_path / f"{name}_asr.json"), "--out", str(tmp_path / name / "r.json")])
        saved = json.loads((tmp_path / name / "r.json").read_text())
        assert code == (0 if name == "good" else 1) and saved["met"] == (name == "good")
    out = capsys.readouterr().out
    assert "target wer: 60.0 (needed <= 10.0): MISSED" in out and "| demo_colour | 60.0 | 40.0 | 100.0 | 90.0 |" in out


def test_a_transcription_report_without_spoken_wer_is_refused():
    answers, _ = _reports()
    with pytest.raises(ValueError, match="--transcribe"):
        start_report.start_report(answers, {"wer": {"text": 0.0}, "n": 3}, **BOUNDS)


def test_excluded_sentences_leave_the_wer_target(tmp_path):
    """--exclude_sentences: the WER target counts only the other held-out sentences, read from the
    transcription's predictions (hand-computed: 1 edit in 4 words), the WER of all is kept."""
    answers, transcribe = _reports(wer=0.05)
    rows = [("Is there a red star?", "Is there a red star?", "audio"),      # excluded: spoken in training
            ("Where is the circle?", "Where is the square?", "audio"),      # 1 substitution of 4 words
            ("Where is the circle?", "nothing alike", "text")]             # the typed twin: not counted
    (tmp_path / "asr.json").write_text(json.dumps(transcribe))
    (tmp_path / "asr.predictions.jsonl").write_text("".join(
        json.dumps({"answer": ref, "prediction": pred, "mode": mode}) + "\n" for ref, pred, mode in rows))
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    (tmp_path / "exclude.json").write_text(json.dumps(["Is there a red star?"]))
    code = start_report.main(["--answers", str(tmp_path / "answers.json"), "--transcribe", str(tmp_path / "asr.json"),
                              "--out", str(tmp_path / "r.json"), "--exclude_sentences", str(tmp_path / "exclude.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and report["targets"]["wer"]["value"] == pytest.approx(25.0) and not report["targets"]["wer"]["met"]
    assert report["wer_spoken_all"] == 0.05 and report["wer_excluded"] == 1 and report["wer_n"] == 1
