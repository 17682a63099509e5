"""Ranking by drag and drop, with ties, as Argilla's ranking question does it.

The board shows the item's answers as cards (their letter and first words) and K numbered rank
slots. A card dragged into a slot takes that rank; a slot may hold several (a tie); a card
dragged back to "not ranked yet" leaves the ranking. With the keyboard: Tab to a card and
type its rank (1..K), or 0 to take it out. Every move writes the ranking into the typed
ranking box (`B > A = C > D`), which stays the one thing submitted, so the typed path and the
board can never disagree, and power users keep typing. The board is drawn on the server for
each item (placing the cards of a suggested ranking); the script below moves cards in the
browser only.
"""

from __future__ import annotations

import html

SNIPPET_CHARS = 90


def board_html(answers: list[dict], ranking_text: str = "") -> str:
    """The board for answers [{"letter", "text"}], cards placed as `ranking_text` says (e.g. a
    suggestion, `B > A = C`); the others wait in "not ranked yet"."""
    k = len(answers)
    placed: dict[str, int] = {}
    for rank, level in enumerate((ranking_text or "").replace(" ", "").split(">"), start=1):
        for letter in filter(None, level.split("=")):
            placed.setdefault(letter.upper(), rank)
    cards = {a["letter"]: _card(a) for a in answers}
    slots = []
    for rank in range(1, k + 1):
        inside = "".join(cards[letter] for letter in cards if placed.get(letter) == rank)
        slots.append(f'<div class="rank-slot" data-rank="{rank}"><span class="rank-number">{rank}</span>'
                     f'<div class="rank-cards">{inside}</div></div>')
    pool = "".join(cards[letter] for letter in cards if letter not in placed)
    return (f'<div class="rank-board" data-k="{k}" role="group" aria-label="Rank the answers">'
            f'<p class="rank-help">Drag each answer into a rank (several in one rank are a tie), or Tab to a '
            f'card and type its rank 1–{k} (0 takes it out). The ranking box below follows.</p>'
            f'{"".join(slots)}<div class="rank-slot rank-pool" data-rank="0"><span class="rank-number">not '
            f'ranked yet</span><div class="rank-cards">{pool}</div></div></div>')


def _card(answer: dict) -> str:
    text = " ".join(answer["text"].split())
    snippet = html.escape(text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "…", quote=True)
    letter = html.escape(answer["letter"])
    return (f'<div class="rank-card" draggable="true" tabindex="0" data-letter="{letter}" '
            f'aria-label="Answer {letter}: type its rank"><b>{letter}</b> <span>{snippet}</span></div>')


BOARD_CSS = """
.rank-board { display: flex; flex-direction: column; gap: 6px; }
.rank-help { margin: 0 0 4px; font-size: 0.9em; opacity: 0.8; }
.rank-slot { display: flex; align-items: center; gap: 8px; min-height: 44px; padding: 4px 8px;
             border: 2px dashed var(--border-color-primary, #ccc); border-radius: 8px; }
.rank-slot.rank-over { border-color: var(--color-accent, #f97316); background: var(--background-fill-secondary); }
.rank-number { min-width: 2.2em; font-weight: 700; opacity: 0.7; }
.rank-pool .rank-number { min-width: 7em; font-weight: 400; }
.rank-cards { display: flex; flex-wrap: wrap; gap: 6px; flex: 1; }
.rank-card { cursor: grab; padding: 6px 10px; border-radius: 6px; max-width: 100%;
             border: 1px solid var(--border-color-primary, #ccc); background: var(--background-fill-primary); }
.rank-card:focus-visible { outline: 3px solid var(--color-accent, #f97316); outline-offset: 2px; }
.rank-card span { opacity: 0.8; }
"""

# Appended to the page's shortcuts script (app/ui.py): event delegation, so boards drawn again
# for each item need no wiring of their own.
BOARD_JS = """
  const boardOf = (el) => el && el.closest && el.closest(".rank-board");
  const writeRanking = (board) => {
    const levels = [...board.querySelectorAll(".rank-slot:not(.rank-pool)")]
      .map((slot) => [...slot.querySelectorAll(".rank-card")].map((c) => c.dataset.letter).sort().join(" = "))
      .filter((level) => level);
    const box = document.querySelector("#ranking textarea, #ranking input");
    if (!box) return;
    box.value = levels.join(" > ");
    box.dispatchEvent(new Event("input", {bubbles: true}));
  };
  const moveCard = (card, slot) => {
    slot.querySelector(".rank-cards").appendChild(card);
    writeRanking(boardOf(slot));
  };
  document.addEventListener("dragstart", (event) => {
    const card = event.target.closest && event.target.closest(".rank-card");
    if (!card) return;
    event.dataTransfer.setData("text/plain", card.dataset.letter);
    event.dataTransfer.effectAllowed = "move";
    window.rankloopDragged = card;
  });
  document.addEventListener("dragover", (event) => {
    const slot = event.target.closest && event.target.closest(".rank-slot");
    if (!slot || !window.rankloopDragged) return;
    event.preventDefault();
    slot.classList.add("rank-over");
  });
  document.addEventListener("dragleave", (event) => {
    const slot = event.target.closest && event.target.closest(".rank-slot");
    if (slot) slot.classList.remove("rank-over");
  });
  document.addEventListener("drop", (event) => {
    const slot = event.target.closest && event.target.closest(".rank-slot");
    const card = window.rankloopDragged;
    window.rankloopDragged = null;
    if (!slot || !card || boardOf(slot) !== boardOf(card)) return;
    event.preventDefault();
    slot.classList.remove("rank-over");
    moveCard(card, slot);
  });
  document.addEventListener("keydown", (event) => {
    const card = event.target.closest && event.target.closest(".rank-card");
    if (!card || event.ctrlKey || event.metaKey || event.altKey || !/^[0-9]$/.test(event.key)) return;
    const board = boardOf(card);
    const slot = board.querySelector(`.rank-slot[data-rank="${event.key}"]`);
    event.preventDefault();
    event.stopPropagation();  // a digit on a card is its rank, not a page shortcut
    if (slot) { moveCard(card, slot); card.focus(); }
  }, true);
"""
