"""A real browser (Playwright driving Debian's chromium) plays Deep Reveal against the real server:

* a whole quota at desktop width: consent with Prolific parameters; a correct guess after two reveals,
  described before the answer (the last level still on screen, the answer nowhere in the page); a wrong
  guess whose description is skipped; a resign; one of the three is the gold round (its caption says what is
  really revealed); the end screen with the code; leaderboard, stats and admin pages; the database rows;
* a lease that runs out while the player is away (the next click says so and a new round follows);
* a study that is full (the page before consent);
* a 390 px phone: consent, play, describe, stats and admin pages without horizontal overflow.

One screenshot per screen goes to out/study-browser/ (not in git)."""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from convlens.study.store.config import load_secrets
from convlens.study.store.db import Event, Participant, Play, Round, utcnow
from study.conftest import CLASSES, CSRF_META, set_study
from study.helpers import LiveServer

CHROMIUM = os.environ.get("CONVLENS_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[2] / "out" / "study-browser"
NICK = "<script>pwned=1</script>Ann"  # fits the 32-character nickname limit
DESCRIPTION = '<img src=x onerror="window.pwned=2"> striped fur, pointed ears'
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module", autouse=True)
def shots() -> None:
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)


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

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def step(self, number: int) -> None:
        self.page.wait_for_function(
            "n => document.getElementById('level-caption').textContent.startsWith('Step ' + n + ' ')", arg=number)
        self.page.wait_for_function("() => { const i = document.getElementById('round-image');"
                                    " return i.complete && i.naturalWidth > 0; }")

    def result(self, title: str) -> None:
        self.page.wait_for_function("t => document.getElementById('result-title').textContent === t", arg=title)

    def no_overflow(self) -> None:
        width = self.page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= self.page.viewport_size["width"], f"{self.page.url}: {width} px wide"


class Database:
    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)

    def active(self) -> tuple[str, bool]:
        """(true class, gold) of the running play."""
        with Session(self.engine) as session:
            row = session.execute(select(Round.true_class, Round.gold).join(Play, Play.round_id == Round.id)
                                  .where(Play.state == "active")).one()
        return row[0], row[1]

    def expire_leases(self) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(Participant).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def _gold_caption(page: Any, gold: bool) -> None:
    caption = page.inner_text("#level-caption")
    assert ("50 % of the image revealed" in caption) == gold and ("2 % of the image revealed" in caption) != gold


def _describe_round(screens: Screens, db: Database) -> bool:
    """Reveal twice, guess right, describe before the answer; returns whether it was the gold round."""
    page = screens.page
    screens.step(1)
    answer, gold = db.active()
    _gold_caption(page, gold)
    screens.shot("07-gold-round" if gold else "02-play-step1")
    for step in (2, 3):
        page.click("#reveal")
        screens.step(step)
    screens.shot("03-play-step3")
    level_image = page.get_attribute("#round-image", "src")
    page.click(f"#classes button:text-is('{answer}')")
    page.wait_for_selector("#panel-describe", state="visible")
    assert page.get_attribute("#round-image", "src") == level_image  # the last level stays on screen
    assert page.inner_text("#level-caption").startswith("Step 3 of 6")
    visible = page.inner_text("body").replace(page.inner_text("#classes"), "")
    assert "Correct" not in visible and page.inner_text("#score") == "0"  # nothing about the answer yet
    screens.shot("04-describe-before-the-answer")
    page.fill("#description", DESCRIPTION)
    page.select_option("#language", "it")
    page.click("#send-description")
    screens.result("Correct!")
    assert page.inner_text("#level-caption") == "The whole image" and answer in page.inner_text("#result-text")
    screens.shot("05-answer-after-the-description")
    return gold


def _play_quota(screens: Screens, db: Database) -> list[bool]:
    page = screens.page
    golds = [_describe_round(screens, db)]
    page.click("#next")
    screens.step(1)
    answer, gold = db.active()
    golds.append(gold)
    _gold_caption(page, gold)
    screens.shot("07-gold-round" if gold else "02-play-step1")
    page.click(f"#classes button:text-is('{next(c for c in CLASSES if c != answer)}')")
    page.wait_for_selector("#panel-describe", state="visible")
    page.click("#skip-description")
    screens.result("Not quite.")
    screens.shot("06-lose-after-skip")
    page.click("#next")
    screens.step(1)
    golds.append(db.active()[1])
    _gold_caption(page, golds[-1])
    screens.shot("07-gold-round" if golds[-1] else "02-play-step1")
    page.click("#resign")
    screens.result("Round given up")
    assert page.inner_text("#next") == "Finish"
    page.click("#next")
    page.wait_for_selector("#panel-done", state="visible")
    assert page.inner_text("#completion-code") == "DONE42"
    screens.shot("08-done")
    return golds


def _check_database(db: Database) -> None:
    with Session(db.engine) as session:
        person = session.scalar(select(Participant))
        plays = list(session.scalars(select(Play).order_by(Play.position)))
        events = [(e.type, e.level, e.screen) for e in session.scalars(select(Event).order_by(Event.id))]
    assert (person.nickname, person.prolific_pid, person.study_id_param, person.session_id_param) == (
        NICK, "prolific-1", "st-1", "se-1")
    assert (person.plays, person.wins, person.score, person.completed_at is not None) == (3, 1, 80, True)
    assert [(p.state, p.level, p.score, p.position) for p in plays] == [("win", 2, 80, 1), ("lose", 0, 0, 2),
                                                                        ("resign", 0, 0, 3)]
    assert (plays[0].description, plays[0].language, plays[0].description_screen) == (DESCRIPTION, "it", "level")
    assert plays[1].description is None  # skipped
    assert [e[0] for e in events] == ["start", "reveal", "reveal", "guess", "describe", "start", "guess", "skip",
                                      "start", "resign"]
    assert {e[2] for e in events} == {"level"}


def test_browser_plays_a_whole_quota(browser: Any, study_dir: Path) -> None:
    set_study(study_dir, completion_url="https://app.prolific.com/submissions/complete?cc=DONE42")
    db_url = f"sqlite:///{study_dir / 'study.sqlite'}"
    server = LiveServer(study_dir).start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(300_000)  # every wait ends on its event; the bound only catches a hang
        screens = Screens(page)
        page.goto(f"{server.url}/?PROLIFIC_PID=prolific-1&STUDY_ID=st-1&SESSION_ID=se-1")
        assert "You will play 3 rounds" in " ".join(page.inner_text("main").split())
        screens.shot("01-consent")
        page.fill("#nickname", NICK)
        page.check("#consent")
        page.click("#start")
        page.wait_for_url("**/play")
        assert page.inner_text("#rounds-total") == "3"
        db = Database(db_url)
        golds = _play_quota(screens, db)
        assert sum(golds) == 1  # the quota's one gold round, somewhere in the sequence
        page.goto(f"{server.url}/done")
        assert "DONE42" in page.inner_text("#completion-code")
        screens.shot("08b-done-page")
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
        for thumb in page.query_selector_all("img.thumb"):  # lazy images: load each by showing it
            thumb.scroll_into_view_if_needed()
        page.wait_for_function("() => [...document.querySelectorAll('img.thumb')].every(i => i.naturalWidth > 0)")
        page.evaluate("window.scrollTo(0, 0)")
        screens.shot("11-admin")
        page.click("#sign-out")
        page.wait_for_selector("#token")
        assert page.evaluate("window.pwned") is None
        assert screens.errors == []
        _check_database(db)
        db.engine.dispose()
    finally:
        server.kill()


def test_browser_an_expired_lease_gives_a_new_round(browser: Any, study_dir: Path) -> None:
    server = LiveServer(study_dir).start()
    db = Database(f"sqlite:///{study_dir / 'study.sqlite'}")
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        screens = Screens(page)
        page.goto(server.url + "/")
        page.check("#consent")
        page.click("#start")
        screens.step(1)
        first = page.get_attribute("#round-image", "src")
        db.expire_leases()  # the player was away longer than the lease
        page.click("#reveal")
        page.wait_for_selector("#notice", state="visible")
        assert "expired after 20 minutes" in page.inner_text("#notice")
        page.wait_for_function("s => document.getElementById('round-image').getAttribute('src') !== s", arg=first)
        screens.step(1)
        assert page.inner_text("#round-number") == "1"  # the abandoned round does not count
        screens.shot("12-lease-expired")
        with Session(db.engine) as session:
            assert list(session.scalars(select(Play.state).order_by(Play.id))) == ["abandoned", "active"]
        assert [e for e in screens.errors if "status of 409" not in e] == []  # the refused reveal, and only it
    finally:
        db.engine.dispose()
        server.kill()


def _fill(url: str) -> int:
    """Register participants over HTTP until the consent page says the study is full."""
    joined = 0
    while True:
        with httpx.Client(base_url=url, timeout=300) as client:
            page = client.get("/")
            if 'id="study-full"' in page.text:
                return joined
            csrf = CSRF_META.search(page.text).group(1)
            form = {"csrftoken": csrf, "consent": "yes", "consent_version": "1"}
            assert client.post("/consent", data=form).status_code == 303
            joined += 1


def test_browser_a_full_study_and_a_phone(browser: Any, study_dir: Path) -> None:
    """At 390 px: consent, a round, its description, stats and admin fit the width; then the study fills up
    and a newcomer sees the full page, before any consent."""
    config = json.loads((study_dir / "study.json").read_text())
    assert config["plays_per_round"] == 2
    server = LiveServer(study_dir).start()
    db = Database(f"sqlite:///{study_dir / 'study.sqlite'}")
    try:
        page = browser.new_page(viewport=PHONE, device_scale_factor=2, is_mobile=True)
        screens = Screens(page)
        page.goto(server.url + "/")
        screens.no_overflow()
        screens.shot("20-phone-consent")
        page.fill("#nickname", "a-rather-long-nickname-for-phones")
        page.check("#consent")
        page.click("#start")
        screens.step(1)
        screens.no_overflow()
        screens.shot("21-phone-play")
        answer, _ = db.active()
        page.click(f"#classes button:text-is('{answer}')")
        page.wait_for_selector("#panel-describe", state="visible")
        screens.no_overflow()
        screens.shot("22-phone-describe")
        page.fill("#description", "stripes")
        page.click("#send-description")
        screens.result("Correct!")
        screens.no_overflow()
        screens.shot("23-phone-answer")
        page.goto(server.url + "/stats")
        screens.no_overflow()
        screens.shot("24-phone-stats")
        page.goto(server.url + "/admin")
        page.fill("#token", load_secrets(study_dir).admin_token)
        page.click("button[type=submit]")
        page.wait_for_selector("#participants")
        screens.no_overflow()
        screens.shot("25-phone-admin")
        assert _fill(server.url) >= 1
        newcomer = browser.new_page(viewport={"width": 1280, "height": 860})
        newcomer.goto(server.url + "/?PROLIFIC_PID=late-1")
        assert newcomer.inner_text("#study-full h1") == "This study is full"
        assert newcomer.query_selector("#consent-form") is None
        newcomer.screenshot(path=str(SHOTS / "13-full.png"), full_page=True)
        small = browser.new_page(viewport=PHONE)
        small.goto(server.url + "/")
        small.screenshot(path=str(SHOTS / "26-phone-full.png"), full_page=True)
        assert screens.errors == []
    finally:
        db.engine.dispose()
        server.kill()
