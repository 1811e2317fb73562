"""A real browser (Playwright driving Debian's chromium) plays Deep Reveal against the real server:
consent with Prolific parameters, reveal more twice, a correct guess with a description, a resign, a wrong
guess, the end screen, the leaderboard, the stats and the admin page; then the database rows are checked.
One screenshot per screen goes to out/study-browser/ (not in git)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from convlens.study.store.config import load_secrets
from convlens.study.store.db import Event, Participant, Play, Round
from study.conftest import CLASSES
from study.helpers import LiveServer

CHROMIUM = os.environ.get("CONVLENS_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[2] / "out" / "study-browser"
NICK = "<script>pwned=1</script>Ann"  # fits the 32-character nickname limit
DESCRIPTION = '<img src=x onerror="window.pwned=2"> striped fur, pointed ears'


@pytest.fixture
def browser(socket_dir: Path) -> Any:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (bash scripts/install_system_deps.sh installs it)")
    with playwright.sync_playwright() as p:
        # chromium's profile socket goes under TMPDIR: a short one, whatever the user's TMPDIR
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS,
                                     env={**os.environ, "TMPDIR": str(socket_dir)})
        yield instance
        instance.close()


class Screens:
    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        shutil.rmtree(SHOTS, ignore_errors=True)
        SHOTS.mkdir(parents=True)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def step(self, number: int) -> None:
        self.page.wait_for_function(
            "n => document.getElementById('level-caption').textContent.startsWith('Step ' + n + ' ')", arg=number)
        self.page.wait_for_function("() => { const i = document.getElementById('round-image');"
                                    " return i.complete && i.naturalWidth > 0; }")

    def result(self, title: str) -> None:
        self.page.wait_for_function("t => document.getElementById('result-title').textContent === t", arg=title)


def _answer(db: str) -> str:
    engine = create_engine(db)
    with Session(engine) as session:
        answer = session.scalar(select(Round.true_class).join(Play, Play.round_id == Round.id)
                                .where(Play.state == "active"))
    engine.dispose()
    return answer


def _play_three_rounds(screens: Screens, db: str) -> None:
    page = screens.page
    screens.step(1)
    screens.shot("02-round-step1")
    for step in (2, 3):
        page.click("#reveal")
        screens.step(step)
    screens.shot("03-round-step3-after-two-reveals")
    page.click(f"#classes button:text-is('{_answer(db)}')")
    screens.result("Correct!")
    screens.shot("04-win-describe")
    page.fill("#description", DESCRIPTION)
    page.select_option("#language", "it")
    page.click("#send-description")
    page.wait_for_selector("#next", state="visible")
    screens.shot("05-described")
    page.click("#next")
    screens.step(1)
    page.click("#resign")
    screens.result("Round given up")
    screens.shot("06-resigned")
    page.click("#next")
    screens.step(1)
    answer = _answer(db)
    page.click(f"#classes button:text-is('{next(c for c in CLASSES if c != answer)}')")
    screens.result("Not quite.")
    screens.shot("07-lose")
    page.click("#skip-description")
    page.click("#next")
    page.wait_for_selector("#panel-done", state="visible")
    assert page.inner_text("#completion-code") == "DONE42"
    screens.shot("08-done")


def _check_database(db: str) -> None:
    engine = create_engine(db)
    with Session(engine) as session:
        person = session.scalar(select(Participant))
        plays = list(session.scalars(select(Play).order_by(Play.position)))
        events = [(e.type, e.level) for e in session.scalars(select(Event).order_by(Event.id))]
    engine.dispose()
    assert (person.nickname, person.prolific_pid, person.study_id_param, person.session_id_param) == (
        NICK, "prolific-1", "st-1", "se-1")
    assert (person.plays, person.wins, person.score) == (3, 1, 80)
    assert [(p.state, p.level, p.score) for p in plays] == [("win", 2, 80), ("resign", 0, 0), ("lose", 0, 0)]
    assert (plays[0].description, plays[0].language) == (DESCRIPTION, "it")
    assert plays[2].description is None  # skipped
    assert events == [("start", 0), ("reveal", 1), ("reveal", 2), ("guess", 2), ("describe", 2), ("start", 0),
                      ("resign", 0), ("start", 0), ("guess", 0)]


def test_browser_plays_whole_rounds(browser: Any, study_dir: Path) -> None:
    config = json.loads((study_dir / "study.json").read_text())
    config.update(rounds_per_player=3, completion_url="https://app.prolific.com/submissions/complete?cc=DONE42")
    (study_dir / "study.json").write_text(json.dumps(config))
    db = f"sqlite:///{study_dir / 'study.sqlite'}"
    server = LiveServer(study_dir).start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(300_000)  # every wait ends on its event; the bound only catches a hang
        screens = Screens(page)
        page.goto(f"{server.url}/?PROLIFIC_PID=prolific-1&STUDY_ID=st-1&SESSION_ID=se-1")
        screens.shot("01-consent")
        page.fill("#nickname", NICK)
        page.check("#consent")
        page.click("#start")
        page.wait_for_url("**/play")
        _play_three_rounds(screens, db)
        page.goto(f"{server.url}/leaderboard")
        assert page.inner_text("#leaderboard td.name") == NICK  # shown as text, not run
        screens.shot("09-leaderboard")
        page.goto(f"{server.url}/stats")
        screens.shot("10-stats")
        page.goto(f"{server.url}/admin")
        page.fill("#token", load_secrets(study_dir).admin_token)
        page.click("button[type=submit]")
        page.wait_for_selector("#participants")
        assert page.inner_text("#participants td.name") == NICK
        screens.shot("11-admin")
        assert page.evaluate("window.pwned") is None
        assert screens.errors == []
        _check_database(db)
    finally:
        server.kill()
