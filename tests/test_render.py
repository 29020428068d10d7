"""The upload bar's figures: what there is to send grows while a cold submit's freeze still
reads, and the bar shows it once it is worth a bar."""

from __future__ import annotations

from launcher.render import UploadBar


def test_upload_bar_totals_grow_and_it_shows_past_its_threshold() -> None:
    bar = UploadBar(enabled=True)
    bar.enabled = True  # as on a terminal (pytest's stderr is not one)
    mib = 2**20
    bar.add(3 * mib, 100)  # a first batch, for each node
    bar.advance(1 * mib)
    assert bar.progress is None  # not worth a bar yet
    bar.add(6 * mib, 200)
    try:
        assert bar.progress is not None
        (task,) = bar.progress.tasks
        assert (task.total, task.completed, task.fields["blobs"]) == (9 * mib, 1 * mib, 300)
        bar.advance(2 * mib)
        bar.add(1 * mib, 5)  # the manifest found a little more missing
        assert (task.total, task.completed, task.fields["blobs"]) == (10 * mib, 3 * mib, 305)
    finally:
        bar.stop()
    assert bar.progress is None
    bar.stop()  # twice is harmless: a failed stream and the upload both end it


def test_upload_bar_stays_off_when_piped() -> None:
    bar = UploadBar(enabled=False)
    bar.add(100 * 2**20, 1)
    bar.advance(50 * 2**20)
    assert bar.progress is None
