// Drives the Atelier chat page in the system Chromium via playwright-core and prints what it
// observed as one JSON object on stdout; tests/web/test_web_chat.py makes the assertions.
// Usage: node drive.mjs '<scenario JSON>' where the scenario is
//   {"url", "screenshot", "apiKey", "question", "failPrompt"}: the page's address, where to save the
//   screenshot, the API key to save in the settings, a question to ask, and a message the server rejects.
// Never downloads a browser: executablePath is Debian's /usr/bin/chromium (or $CHROMIUM).
import { chromium } from "playwright-core";

const scenario = JSON.parse(process.argv[2]);
const STEP_MS = 10_000;
const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const out = { steps: [], consoleErrors: [] };
const step = (name) => out.steps.push(name);

// Launch gives every run a fresh temporary --user-data-dir (Playwright refuses one in args).
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS, timeout: STEP_MS,
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("console", (m) => {
    if (m.type() === "error") out.consoleErrors.push(m.text() + " @ " + (m.location().url || ""));
  });
  page.on("pageerror", (e) => out.consoleErrors.push(String(e)));

  await page.goto(scenario.url);
  step("loaded");

  // Settings: an API key that must come back as Authorization: Bearer.
  await page.locator(".settings summary").click();
  await page.getByLabel("API key").fill(scenario.apiKey);
  await page.getByRole("button", { name: "Save" }).click();
  await page.locator("#settings-status").filter({ hasText: "Saved" }).waitFor();
  step("api-key-saved");

  // Shift+Enter is a newline, not a send.
  const prompt = page.getByLabel("Message");
  await prompt.fill("line one");
  await prompt.press("Shift+Enter");
  await prompt.pressSequentially("line two");
  out.shiftEnterValue = await prompt.inputValue();
  out.messagesAfterShiftEnter = await page.locator("#messages > li").count();

  // Record every text the streaming answer shows, to prove it grew chunk by chunk.
  await page.evaluate(() => {
    window.__snapshots = [];
    new MutationObserver(() => {
      const answers = document.querySelectorAll("#messages li.assistant .content");
      const last = answers[answers.length - 1];
      const text = last ? last.textContent : "";
      const s = window.__snapshots;
      if (text && s[s.length - 1] !== text) s.push(text);
    }).observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true });
  });
  await prompt.fill(scenario.question);
  await prompt.press("Enter");
  const answer = page.locator("#messages li.assistant").last();
  await answer.and(page.locator('[data-state="done"]')).waitFor();
  step("answer-streamed");
  out.snapshots = await page.evaluate(() => window.__snapshots);
  out.answerText = await answer.locator(".content").textContent();
  out.userText = await page.locator("#messages li.user .content").first().textContent();
  out.routeBadge = await answer.locator(".badge.route").textContent();
  out.confidence = await answer.locator(".confidence").textContent();
  out.timings = (await answer.locator(".timings").count()) ? await answer.locator(".timings").textContent() : null;
  out.ariaLive = await page.locator("#messages").getAttribute("aria-live");

  // Sources: collapsed until opened; model/source text is shown literally, never parsed as HTML.
  const details = answer.locator("details.sources");
  out.sourcesOpenBefore = await details.evaluate((d) => d.open);
  await details.locator("summary").click();
  out.sourcesOpenAfter = await details.evaluate((d) => d.open);
  out.sources = await details.locator("li.source").evaluateAll((items) => items.map((li) => ({
    n: li.querySelector(".source-n").textContent,
    title: li.querySelector(".source-title").textContent,
    source: li.querySelector(".source-path").textContent,
    text: li.querySelector(".source-text").textContent,
  })));
  out.injectedElements = await page.evaluate(() => document.querySelectorAll("#messages img, #messages b").length);
  out.xssFired = await page.evaluate(() => Boolean(window.__xss));
  step("sources-checked");

  // Thumbs up: the button shows the feedback was recorded.
  await answer.getByRole("button", { name: "Good answer" }).click();
  const up = answer.getByRole("button", { name: "Good answer" });
  await up.and(page.locator('[aria-pressed="true"]')).waitFor();
  out.thumbUpText = await up.textContent();
  step("feedback-recorded");

  // Reload: the conversation, its route, sources and feedback come back from localStorage.
  await page.reload();
  await page.locator("#messages li.assistant").first().waitFor();
  out.afterReload = {
    messages: await page.locator("#messages > li .content").allTextContents(),
    routeBadge: await page.locator("#messages li.assistant .badge.route").first().textContent(),
    sourcesOpen: await page.locator("#messages li.assistant details.sources").first().evaluate((d) => d.open),
    sourceCount: await page.locator("#messages li.assistant li.source").count(),
    thumbUpPressed: await page.locator("#messages li.assistant .thumb.up").first().getAttribute("aria-pressed"),
  };
  step("reloaded");

  // Thumbs down asks what the answer should have said; the correction goes with the rating.
  const rated = page.locator("#messages li.assistant").first();
  await rated.getByRole("button", { name: "Bad answer" }).click();
  const box = rated.getByLabel("What should it have said?");
  await box.waitFor();
  out.correctionFocused = await box.evaluate((node) => node === document.activeElement);
  await box.fill(scenario.correction);
  await rated.getByRole("group", { name: "Correct this answer" }).getByRole("button", { name: "Send" }).click();
  const down = rated.getByRole("button", { name: "Bad answer" });
  await down.and(page.locator('[aria-pressed="true"]')).waitFor();
  out.thumbDownText = await down.textContent();
  out.correctionFormsLeft = await page.locator(".correction-form").count();
  step("correction-sent");

  // A server error is shown inline, in the answer that failed.
  await page.getByLabel("Message").fill(scenario.failPrompt);
  await page.getByLabel("Message").press("Enter");
  const failed = page.locator("#messages li.assistant").last();
  await failed.and(page.locator('[data-state="error"]')).waitFor();
  out.errorText = await failed.locator(".error").textContent();
  step("error-shown");

  await page.locator("#messages li.assistant details.sources summary").first().click();
  await page.screenshot({ path: scenario.screenshot, fullPage: true });
  step("screenshot");

  // New conversation: empty list, new thread id.
  const threadBefore = await page.evaluate(() => JSON.parse(localStorage.getItem("atelier.chat.v1")).threadId);
  await page.getByRole("button", { name: "New conversation" }).click();
  out.messagesAfterNew = await page.locator("#messages > li").count();
  const threadAfter = await page.evaluate(() => JSON.parse(localStorage.getItem("atelier.chat.v1")).threadId);
  out.threadBefore = threadBefore;
  out.newThreadDiffers = threadAfter !== threadBefore;
  step("new-conversation");
} catch (err) {
  out.failure = String(err && err.stack ? err.stack : err);
} finally {
  await browser.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}
