"""Completion and selection rules, on their own."""

from __future__ import annotations

from covid_plugin.config import SelectionSettings
from covid_plugin.series import completion, rejection_reason
from covid_plugin.store.jobs import SeriesRecord

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CR = "1.2.840.10008.5.1.4.1.1.1"


def series(**kw) -> SeriesRecord:
    base = dict(job_id=1, series_uid="1.2.3", study_uid="1.2", modality="CT", sop_class_uid=CT,
                body_part="CHEST", description="", image_type="ORIGINAL\\PRIMARY\\AXIAL",
                calling_ae="PACS", n_instances=120, last_at=100.0, released_at=100.5)
    return SeriesRecord(**(base | kw))


RULES = SelectionSettings()


def test_complete_needs_quiet_period_and_no_open_association():
    s = series()
    assert completion(s, now=105.0, quiet_period_s=10, active_series=set()) == "wait"
    assert completion(s, now=110.0, quiet_period_s=10, active_series=set()) == "complete"
    assert completion(s, now=500.0, quiet_period_s=10, active_series={"1.2.3"}) == "wait"


def test_nothing_completes_before_one_quiet_period_after_start_up():
    s = series()  # quiet for long, but the node only just started
    assert completion(s, now=500.0, quiet_period_s=10, active_series=set(),
                      held_until=505.0) == "wait"
    assert completion(s, now=505.0, quiet_period_s=10, active_series=set(),
                      held_until=505.0) == "complete"


def test_a_transfer_that_broke_off_is_incomplete_until_resent_or_timed_out():
    aborted = series(released_at=None, interrupted_at=100.2)  # sender killed mid-series
    assert completion(aborted, 200.0, 10, set(), incomplete_timeout_s=600) == "wait"
    assert completion(aborted, 700.3, 10, set(), incomplete_timeout_s=600) == "incomplete"
    # an earlier clean release does not cover instances that came after it
    cut = series(released_at=50.0, interrupted_at=None)  # e.g. the node itself was killed
    assert completion(cut, 200.0, 10, set(), incomplete_timeout_s=600) == "wait"
    # the sender sends again and releases: complete
    resent = series(last_at=300.0, released_at=300.5, interrupted_at=100.2)
    assert completion(resent, 311.0, 10, set(), incomplete_timeout_s=600) == "complete"
    # an abort after the last clean release holds it again
    again = series(released_at=100.5, interrupted_at=101.0)
    assert completion(again, 200.0, 10, set(), incomplete_timeout_s=600) == "wait"


def test_chest_ct_and_chest_radiograph_are_selected():
    assert rejection_reason(series(), RULES) is None
    assert rejection_reason(series(body_part="", description="CT THORAX W/O"), RULES) is None
    assert rejection_reason(series(modality="CR", sop_class_uid=CR, n_instances=1), RULES) is None


def test_rejections_say_why():
    assert rejection_reason(series(modality="MR"), RULES).startswith("modality MR is not")
    assert "not a chest study (body part HEAD" in rejection_reason(series(body_part="HEAD"),
                                                                    RULES)
    assert rejection_reason(series(image_type="ORIGINAL\\PRIMARY\\LOCALIZER"),
                            RULES) == "localizer/scout image"
    assert rejection_reason(series(description="Topogram 0.6 T20f"),
                            RULES) == "localizer/scout image"
    assert rejection_reason(series(n_instances=3), RULES) == (
        "CT series has 3 slice(s) (needs at least 20)")


def test_enhanced_ct_is_one_instance_with_many_frames():
    assert rejection_reason(series(sop_class_uid=ENHANCED_CT, n_instances=1), RULES) is None


def test_unknown_body_part_follows_the_setting():
    unknown = series(body_part="", description="")
    assert rejection_reason(unknown, RULES) is None
    strict = SelectionSettings(accept_unknown_body_part=False)
    assert "body part unknown" in rejection_reason(unknown, strict)


def test_a_body_part_elsewhere_is_not_overruled_by_a_chest_description():
    head = series(body_part="HEAD", description="CT CHEST W/O")
    assert rejection_reason(head, RULES) == (
        "not a chest study (body part HEAD, though the descriptions mention the chest)")
    assert rejection_reason(series(body_part="CHESTABDPELVIS"), RULES) is None
