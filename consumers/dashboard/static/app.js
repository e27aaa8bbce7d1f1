// The dashboard's only script: pick dead letters to replay, and ask before a purge.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  const picks = Array.from(document.querySelectorAll("input.pick:not(:disabled)"));
  const replay = document.getElementById("replay-selected");
  const update = () => {
    const n = picks.filter((p) => p.checked).length;
    if (replay) {
      replay.disabled = n === 0;
      replay.textContent = n ? `Replay ${n} selected` : "Replay selected";
    }
    if (all) all.checked = n > 0 && n === picks.length;
  };
  if (all) all.addEventListener("change", () => { picks.forEach((p) => { p.checked = all.checked; }); update(); });
  picks.forEach((p) => p.addEventListener("change", update));
  // A per-row button replays only its letter: clear the boxes so they are not sent too.
  document.querySelectorAll("button.replay-one").forEach((b) =>
    b.addEventListener("click", () => { picks.forEach((p) => { p.checked = false; }); }));
  const purge = document.getElementById("confirm-purge");
  if (purge) purge.addEventListener("click", (e) => {
    if (!window.confirm(purge.textContent + " dead letters for good?")) e.preventDefault();
  });
  update();
});
