// Deep Reveal game client: plain JavaScript, no build step. All state lives on the server; the page
// only ever holds the current image token. Every action carries a fresh request id, reused on retry,
// so a repeated request is never counted twice.
//
// A round: reveal / guess / give up; after a guess the description is asked with the last level still on
// screen, and the answer and the full image come only after it is sent or skipped.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const game = document.getElementById("game");
  const classes = JSON.parse(game.dataset.classes);
  const $ = (id) => document.getElementById(id);
  let current = null;

  function uuid4() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  class Refused extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  async function post(path, body) {
    const payload = JSON.stringify({ request_id: uuid4(), ...body });
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await fetch(path, {
          method: "POST", credentials: "same-origin", body: payload,
          headers: { "content-type": "application/json", "x-csrftoken": csrf },
        });
      } catch (err) {
        if (attempt < 3) { await new Promise((r) => setTimeout(r, 500 * (attempt + 1))); continue; }
        throw new Error("The server cannot be reached; check your connection and try again.");
      }
      const data = await response.json().catch(() => ({}));
      if (response.status === 401) { window.location.href = "/"; }
      if (!response.ok) {
        const detail = typeof data.detail === "string" ? data.detail : "The request was refused.";
        throw new Refused(detail, response.status);
      }
      return data;
    }
  }

  function showError(err) {
    $("error").textContent = err ? err.message : "";
    $("error").hidden = !err;
  }

  function showNotice(text) {
    $("notice").textContent = text ? text.charAt(0).toUpperCase() + text.slice(1) : "";
    $("notice").hidden = !text;
  }

  function busy(flag) {
    document.querySelectorAll("#game button").forEach((b) => { b.disabled = flag; });
    if (!flag && current && current.state === "active") {
      $("reveal").disabled = current.level >= current.levels - 1;
    }
  }

  function setImage(view) {
    $("round-image").src = view.image;
    const running = view.state === "active" || view.state === "guessed";
    const shown = `${Number(view.revealed).toLocaleString("en", { maximumFractionDigits: 1 })} %`;
    $("level-caption").textContent = running
      ? `Step ${view.level + 1} of ${view.levels} · ${shown} of the image revealed`
      : "The whole image";
    $("meter-fill").style.width = running ? `${Math.max(1, Math.min(100, view.revealed))}%` : "100%";
  }

  function panels(name) {
    for (const id of ["panel-play", "panel-describe", "panel-result", "panel-done"]) { $(id).hidden = id !== name; }
  }

  function render(view) {
    showError(null);
    if (view.done) { return renderDone(view); }
    current = view;
    if (view.expired) { showNotice("Your last round expired after a long pause; here is a new one."); }
    $("score").textContent = view.score;
    $("round-number").textContent = view.round_number;
    $("rounds-total").textContent = view.rounds_total;
    setImage(view);
    if (view.state === "active") {
      $("status").textContent = `Round ${view.round_number} of ${view.rounds_total}: what is in this image?`;
      panels("panel-play");
    } else if (view.state === "guessed") {
      renderDescribe(view);
    } else {
      renderResult(view);
    }
    busy(false);
  }

  function renderDescribe(view) {
    panels("panel-describe");
    $("status").textContent = `Round ${view.round_number} of ${view.rounds_total}: tell us what you saw`;
    $("your-guess").textContent = view.guessed_class;
    $("description").value = "";
    $("description").focus();
  }

  function renderResult(view) {
    panels("panel-result");
    const titles = { win: "Correct!", lose: "Not quite.", resign: "Round given up" };
    $("result-title").textContent = titles[view.state];
    $("result-title").className = view.state;
    $("status").textContent = `Round ${view.round_number} of ${view.rounds_total} is over.`;
    const answer = `It was “${view.true_class}”.`;
    $("result-text").textContent = view.state === "win"
      ? `${answer} You earned ${view.points} points at step ${view.level + 1}.`
      : view.state === "lose" ? `You said “${view.guessed_class}”. ${answer}` : answer;
    $("next").textContent = view.round_number >= view.rounds_total ? "Finish" : "Next round";
  }

  function renderDone(view) {
    current = null;
    panels("panel-done");
    $("status").textContent = view.completed ? "All rounds played." : "The study has ended for you.";
    document.querySelector(".frame").hidden = true;
    document.querySelector(".board").classList.add("finished");
    $("done-score").textContent = view.score;
    $("done-title").textContent = view.completed ? "Thank you — you have played all your rounds!"
      : "Sorry — this study cannot continue for you";
    $("done-message").textContent = view.message || "";
    $("done-message").hidden = !view.message;
    $("completion").hidden = !view.completion_code;
    $("completion-code").textContent = view.completion_code || "";
    if (view.completion_url) { $("completion-link").href = view.completion_url; $("completion-link").hidden = false; }
  }

  async function act(path, body) {
    busy(true);
    showNotice(null);
    try {
      render(await post(path, body));
    } catch (err) {
      if (err instanceof Refused && err.status === 409 && /expired/.test(err.message)) {
        showNotice(err.message);  // the round's lease ran out: carry on with the next one
        try { render(await post("/api/next", {})); } catch (again) { showError(again); busy(false); }
        showNotice(err.message);
        return;
      }
      showError(err);
      busy(false);
    }
  }

  const playPath = (action) => `/api/plays/${current.play}/${action}`;

  function buildClasses() {
    const box = $("classes");
    for (const name of classes) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "class-choice";
      button.textContent = name;
      button.addEventListener("click", () => act(playPath("guess"), { class_name: name }));
      box.appendChild(button);
    }
  }

  $("reveal").addEventListener("click", () => act(playPath("reveal"), { level: current.level + 1 }));
  $("resign").addEventListener("click", () => act(playPath("resign"), {}));
  $("next").addEventListener("click", () => act("/api/next", {}));
  $("skip-description").addEventListener("click", () => act(playPath("skip"), {}));
  $("describe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("description").value.trim();
    if (!text) { showError(new Error("Please write a few words, or skip.")); return; }
    act(playPath("describe"), { text, language: $("language").value });
  });
  buildClasses();
  act("/api/next", {});
})();
