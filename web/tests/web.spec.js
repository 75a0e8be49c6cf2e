// The web client and the status page, end to end through a real Parley, on a desktop and a phone.
import AxeBuilder from '@axe-core/playwright';
import { expect, test } from '@playwright/test';

const PASSWORD = 'correct horse battery';

/** A fresh account, signed up through the form; the page ends on an empty conversation. */
async function signUp(page, testInfo, name) {
  const email = `${name}-${testInfo.project.name}-${Date.now()}@example.com`;
  await page.goto('/');
  await page.getByRole('button', { name: 'Create an account' }).click();
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill(PASSWORD);
  await page.getByRole('button', { name: 'Create account' }).click();
  await expect(page.getByLabel('Message', { exact: true })).toBeVisible();
  return email;
}

/** The conversation list and search are behind a menu button on a phone. */
async function openSidebar(page) {
  const menu = page.getByRole('button', { name: 'Conversations' });
  if (await menu.isVisible()) await menu.click();
}

/** Sends `text` with the keyboard and returns the reply's article once it is completed. */
async function send(page, text) {
  const composer = page.getByLabel('Message', { exact: true });
  await composer.fill(text);
  await composer.press('Enter');
  return page.locator('article.message.assistant').last();
}

async function accessibilityViolations(page) {
  const results = await new AxeBuilder({ page }).withTags(['wcag2a', 'wcag2aa']).analyze();
  return results.violations.map((violation) => `${violation.id}: ${violation.nodes.map((n) => n.target).join(' ')}`);
}

test('sign up, watch a reply stream, reload and see the thread, and find it by search', async ({ page }, testInfo) => {
  await signUp(page, testInfo, 'journey');
  expect(await accessibilityViolations(page)).toEqual([]);

  const question = 'Tell me about lighthouses and their keepers';
  const reply = await send(page, question);
  // The reply is watched while it is written: streaming, part of the text, then all of it.
  await expect(reply).toHaveAttribute('data-status', 'streaming');
  const partial = await reply.locator('.markdown').innerText();
  const whole = `You said: ${question}. This is Parley's fake model, answering offline.`;
  expect(whole.startsWith(partial.trim())).toBeTruthy();
  expect(partial.trim().length).toBeLessThan(whole.length);
  await expect(reply).toHaveAttribute('data-status', 'completed');
  await expect(reply.locator('.markdown')).toHaveText(whole);
  await expect(page).toHaveURL(/#\/c\/[0-9a-f-]{36}$/);
  // The model titles the conversation after its first exchange; the page and the list show it.
  const title = page.getByRole('heading', { level: 1 });
  await expect(title).not.toHaveText(/^(Untitled|New conversation)$/);
  await openSidebar(page);
  await expect(page.getByRole('complementary').getByRole('link', { name: await title.innerText() })).toBeVisible();

  // Reload: the session and the thread are still there.
  await page.reload();
  await expect(page.locator('article.message.user')).toHaveText(new RegExp(question));
  await expect(page.locator('article.message.assistant .markdown')).toHaveText(whole);
  expect(await accessibilityViolations(page)).toEqual([]);

  // Search finds the message, with the word highlighted, and opens its conversation.
  await openSidebar(page);
  await page.getByLabel('Search messages').fill('lighthouses');
  await page.getByLabel('Search messages').press('Enter');
  const results = page.getByRole('region', { name: 'Search results' });
  await expect(results.locator('mark').first()).toHaveText(/lighthouses/i);
  await results.getByRole('link').first().click();
  await expect(page.locator('article.message.user')).toHaveText(new RegExp(question));
});

test('a reload while a reply streams picks the reply up where it is and follows it to its end', async ({ page }, testInfo) => {
  await signUp(page, testInfo, 'reload');
  const first = await send(page, 'hello');
  await expect(first).toHaveAttribute('data-status', 'completed');
  const long = 'Please write a long story about a lighthouse keeper, the sea, the storms and the ships that pass by';
  const reply = await send(page, long);
  await expect(reply).toHaveAttribute('data-status', 'streaming');
  await page.reload();
  const resumed = page.locator('article.message.assistant').last();
  await expect(resumed).toHaveAttribute('data-status', 'completed');
  await expect(resumed.locator('.markdown')).toHaveText(`You said: ${long}. This is Parley's fake model, answering offline.`);
  // The text is kept when a send is refused (here: too long), to fix and send again.
  const composer = page.getByLabel('Message', { exact: true });
  const tooLong = 'x'.repeat(100_001);
  await composer.fill(tooLong);
  await composer.press('Enter');
  await expect(page.getByRole('alert')).toContainText('content');
  await expect(composer).toHaveValue(tooLong);
});

test('replies render Markdown with highlighted code, sanitised', async ({ page }, testInfo) => {
  await signUp(page, testInfo, 'markdown');
  // The fake model quotes the question, so the reply carries this Markdown back.
  const reply = await send(
    page,
    'Here: **bold** and `code` <img src=x onerror=alert(1)>\n```rust\nfn main() { let answer = 42; }\n```\nThanks',
  );
  await expect(reply).toHaveAttribute('data-status', 'completed');
  await expect(reply.locator('.markdown strong')).toHaveText('bold');
  await expect(reply.locator('.markdown p code')).toHaveText('code');
  await expect(reply.locator('.markdown pre[data-language="rust"] .hljs-keyword').first()).toHaveText('fn');
  await expect(reply.locator('img[onerror]')).toHaveCount(0);
  expect(await page.evaluate(() => window.alerted)).toBeUndefined();
});

test('stop, regenerate, switch versions, edit, and rate a reply', async ({ page, request }, testInfo) => {
  await signUp(page, testInfo, 'branches');
  const long = 'Please write a long story about a lighthouse keeper, the sea, the storms and the ships that pass';
  const stopped = await send(page, long);
  const stop = page.getByRole('button', { name: 'Stop' });
  await expect(stop).toBeEnabled();
  await stop.click();
  await expect(stopped).toHaveAttribute('data-status', 'completed');
  const kept = await stopped.locator('.markdown').innerText();
  expect(kept.length).toBeLessThan(`You said: ${long}.`.length);

  // Regenerate: a second version of the reply, then back to the first.
  await stopped.getByRole('button', { name: 'Regenerate' }).click();
  const second = page.locator('article.message.assistant').last();
  await expect(second.getByRole('group', { name: 'Versions' })).toContainText('2 / 2');
  await expect(second).toHaveAttribute('data-status', 'completed');
  await second.getByRole('button', { name: 'Previous version' }).click();
  await expect(page.locator('article.message.assistant').last().getByRole('group', { name: 'Versions' })).toContainText('1 / 2');
  await expect(page.locator('article.message.assistant .markdown').last()).toHaveText(kept);

  // Edit the question: a new version of it with its own reply.
  await page.locator('article.message.user').getByRole('button', { name: 'Edit' }).click();
  await page.getByLabel('Edit your message').fill('A short question instead');
  await page.getByRole('button', { name: 'Save and send' }).click();
  const edited = page.locator('article.message.user');
  await expect(edited.getByRole('group', { name: 'Versions' })).toContainText('2 / 2');
  const answer = page.locator('article.message.assistant').last();
  await expect(answer.locator('.markdown')).toHaveText(/You said: A short question instead/);

  // Feedback, pressed and stored.
  const good = answer.getByRole('button', { name: 'Good reply' });
  await good.click();
  await expect(good).toHaveAttribute('aria-pressed', 'true');
  const token = await page.evaluate(() => JSON.parse(localStorage.getItem('parley.session')).access_token);
  const replyId = await page.evaluate(async (token) => {
    const hash = window.location.hash.split('/');
    const conversation = hash[hash.length - 1];
    const page = await fetch(`/v1/conversations/${conversation}/messages`, {
      headers: { authorization: `Bearer ${token}` },
    }).then((r) => r.json());
    return page.data[page.data.length - 1].id;
  }, token);
  const feedback = await request.get(`/v1/messages/${replyId}/feedback`, { headers: { authorization: `Bearer ${token}` } });
  expect((await feedback.json()).rating).toBe('up');
});

test('a conversation is renamed and deleted', async ({ page }, testInfo) => {
  await signUp(page, testInfo, 'rename');
  const reply = await send(page, 'something to keep');
  await expect(reply).toHaveAttribute('data-status', 'completed');
  page.once('dialog', (dialog) => dialog.accept('Kept things'));
  await page.getByRole('button', { name: 'Rename' }).click();
  await expect(page.getByRole('heading', { level: 1 })).toHaveText('Kept things');
  await openSidebar(page);
  await expect(page.getByRole('complementary').getByRole('link', { name: 'Kept things' })).toBeVisible();
  const menu = page.getByRole('button', { name: 'Conversations' });
  if (await menu.isVisible()) await menu.click();
  page.once('dialog', (dialog) => dialog.accept());
  await page.getByRole('button', { name: 'Delete' }).click();
  await expect(page.getByRole('heading', { level: 1 })).toHaveText('New conversation');
  await openSidebar(page);
  await expect(page.getByRole('complementary').getByRole('link', { name: 'Kept things' })).toHaveCount(0);
});

test('usage and API keys', async ({ page }, testInfo) => {
  await signUp(page, testInfo, 'keys');
  const reply = await send(page, 'count me');
  await expect(reply).toHaveAttribute('data-status', 'completed');

  await page.getByRole('link', { name: 'Usage' }).click();
  await expect(page.getByRole('heading', { name: 'Usage' })).toBeVisible();
  await expect(page.locator('.totals dd').first()).not.toHaveText('0');
  expect(await accessibilityViolations(page)).toEqual([]);

  await page.getByRole('link', { name: 'API keys' }).click();
  await page.getByLabel('Key name').fill('laptop');
  await page.getByRole('button', { name: 'Create key' }).click();
  await expect(page.getByLabel('Key', { exact: true })).toHaveValue(/^pk_/);
  await expect(page.getByRole('row', { name: /laptop/ })).toBeVisible();
  expect(await accessibilityViolations(page)).toEqual([]);
  page.once('dialog', (dialog) => dialog.accept());
  await page.getByRole('button', { name: 'Revoke laptop' }).click();
  await expect(page.getByRole('row', { name: /laptop/ })).toHaveCount(0);
});

test('a wrong password is refused with a clear message, from the keyboard', async ({ page }) => {
  await page.goto('/');
  await page.getByLabel('Email').focus();
  await page.keyboard.type('nobody@example.com');
  await page.keyboard.press('Tab');
  await page.keyboard.type('not the password');
  await page.keyboard.press('Enter');
  await expect(page.getByRole('alert')).toBeVisible();
  expect(await accessibilityViolations(page)).toEqual([]);
});

test('the status page shows each component and the recent error rate', async ({ page }) => {
  await page.goto('/status');
  await expect(page.getByRole('status')).toHaveText('All systems operational');
  const components = page.getByRole('list', { name: 'Components' });
  for (const name of ['API', 'Conversations', 'Sign-in and accounts', 'AI replies']) {
    await expect(components.getByRole('listitem').filter({ hasText: name })).toContainText('Operational');
  }
  await expect(page.locator('.error-rate')).toContainText('Errors in the last 15 minutes');
  expect(await accessibilityViolations(page)).toEqual([]);
});
