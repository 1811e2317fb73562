// Deep Reveal game client: plain JavaScript, no build step. All state lives on the server; the page
// only ever holds the current image token. Every action carries a fresh request id, reused on retry,
// so a repeated request is never counted twice.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const game = document.getElementById("game");
  const classes = JSON.parse(game.dataset.classes);
  const PERCENT = JSON.parse(game.dataset.percent);  // study.json's reveal_percentages, one per level
  const $ = (id) => document.getElementById(id);
  let current = null;

  function uuid4() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
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
        throw new Error(detail);
      }
      return data;
    }
  }

  function showError(err) {
    $("error").textContent = err ? err.message : "";
    $("error").hidden = !err;
  }

  function busy(flag) {
    document.querySelectorAll("#game button").forEach((b) => { b.disabled = flag; });
    if (!flag && current && current.state === "active") {
      $("reveal").disabled = current.level >= current.levels - 1;
    }
  }

  function setImage(view) {
    $("round-image").src = view.image;
    const step = view.level + 1;
    $("level-caption").textContent = view.state === "active"
      ? `Step ${step} of ${view.levels} · ${PERCENT[view.level] ?? "?"} % revealed`
      : "The whole image";
    $("meter-fill").style.width = view.state === "active" ? `${(100 * step) / view.levels}%` : "100%";
  }

  function panels(name) {
    for (const id of ["panel-play", "panel-result", "panel-done"]) { $(id).hidden = id !== name; }
  }

  function render(view) {
    showError(null);
    if (view.done) { return renderDone(view); }
    current = view;
    $("score").textContent = view.score;
    $("round-number").textContent = view.round_number;
    setImage(view);
    if (view.state === "active") {
      $("status").textContent = `Round ${view.round_number}: what is in this image?`;
      panels("panel-play");
    } else {
      renderResult(view);
    }
    busy(false);
  }

  function renderResult(view) {
    panels("panel-result");
    const titles = { win: "Correct!", lose: "Not quite.", resign: "Round given up" };
    $("result-title").textContent = titles[view.state];
    $("result-title").className = view.state;
    $("status").textContent = `Round ${view.round_number} is over.`;
    const answer = `It was “${view.true_class}”.`;
    $("result-text").textContent = view.state === "win"
      ? `${answer} You earned ${view.points} points at step ${view.level + 1}.`
      : view.state === "lose" ? `You said “${view.guessed_class}”. ${answer}` : answer;
    const describe = view.state !== "resign" && !view.described;
    $("describe-form").hidden = !describe;
    $("next-actions").hidden = describe;
    if (describe) { $("description").value = ""; $("description").focus(); }
  }

  function renderDone(view) {
    current = null;
    panels("panel-done");
    $("status").textContent = "All rounds played.";
    document.querySelector(".frame").hidden = true;
    document.querySelector(".board").classList.add("finished");
    $("done-score").textContent = view.score;
    $("completion").hidden = !view.completion_code;
    $("completion-code").textContent = view.completion_code || "";
    if (view.completion_url) { $("completion-link").href = view.completion_url; $("completion-link").hidden = false; }
  }

  async function act(path, body) {
    busy(true);
    try { render(await post(path, body)); } catch (err) { showError(err); busy(false); }
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
  $("skip-description").addEventListener("click", () => {
    $("describe-form").hidden = true;
    $("next-actions").hidden = false;
  });
  $("describe-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("description").value.trim();
    if (!text) { showError(new Error("Please write a few words, or skip.")); return; }
    act(playPath("describe"), { text, language: $("language").value });
  });
  buildClasses();
  act("/api/next", {});
})();
