// Tern demo chat: rooms, messages with their latency, the roster from presence, and where
// this page is connected. Query: ?name=alice&room=lobby&url=ws://host:port[,ws://other]
// (without url: the nearest region of those the serving node lists at /v1/regions).
import { Client } from './tern.min.js';

const q = new URLSearchParams(location.search);
const name = q.get('name') || `guest-${Math.random().toString(36).slice(2, 6)}`;
const rooms = ['lobby', 'random', 'ops'];
let room = q.get('room') || 'lobby';
if (!rooms.includes(room)) rooms.push(room);
const $ = (id) => document.getElementById(id);
const options = { clientId: name, agent: 'tern-demo/1' };
if (q.get('url')) options.url = q.get('url').split(',');
else options.nearest = location.origin;
if (q.get('transport')) options.transport = q.get('transport');
const client = new Client(options);

// What the end-to-end tests read.
const demo = (window.ternDemo = { client, messages: [], states: [], roster: [], errors: [] });

client.on('state', (c) => {
  demo.states.push(c.state);
  $('state').textContent = c.state + (c.reason && c.state !== 'connected' ? ` (${c.reason})` : '');
  $('state').className = `badge ${c.state}`;
});
client.on('connected', (info) => {
  $('region').textContent = info.region;
  $('node').textContent = info.node;
  $('transport').textContent = info.transport;
  $('me').textContent = info.clientId;
});
client.on('error', (e) => demo.errors.push(e.message));

const text = (data) => (typeof data === 'string' ? data : `(${data.length} bytes)`);
let sub;

function renderRoster() {
  const members = sub ? sub.members() : [];
  demo.roster = members.map((m) => m.clientId);
  $('count').textContent = String(members.length);
  $('roster').replaceChildren(
    ...members
      .sort((a, b) => a.clientId.localeCompare(b.clientId))
      .map((m) => {
        const li = document.createElement('li');
        li.textContent = m.clientId;
        const node = document.createElement('span');
        node.className = 'node';
        node.textContent = m.node;
        li.append(node);
        return li;
      }),
  );
}

function addLine(m) {
  const li = document.createElement('li');
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = `${m.clientId}: `;
  const meta = document.createElement('span');
  meta.className = 'meta';
  const latency = Math.max(0, Date.now() - m.timestampMs);
  meta.textContent = `${latency} ms · from ${m.origin}`;
  li.append(who, document.createTextNode(text(m.data)), meta);
  $('list').append(li);
  li.scrollIntoView({ block: 'end' });
  demo.messages.push({ room, clientId: m.clientId, text: text(m.data), latencyMs: latency, origin: m.origin });
}

async function join(next) {
  if (sub) {
    const old = sub.channel;
    sub = undefined;
    await client.presence.leave(old).catch(() => {});
    await client.unsubscribe(old);
  }
  room = next;
  $('room-name').textContent = room;
  $('list').replaceChildren();
  renderRooms();
  const channel = `chat:${room}`;
  const s = await client.subscribe(channel, { presence: true, rewind: { count: 50 } });
  sub = s;
  s.on('message', (m) => sub === s && addLine(m));
  s.on('presence', () => sub === s && renderRoster());
  s.on('discontinuity', (d) => {
    const li = document.createElement('li');
    li.className = 'gap';
    li.textContent = `some messages were missed: ${d.reason}`;
    $('list').append(li);
  });
  renderRoster();
  await client.presence.enter(channel, JSON.stringify({ name }));
  demo.joined = room;
}

function renderRooms() {
  $('room-list').replaceChildren(
    ...rooms.map((r) => {
      const b = document.createElement('button');
      b.textContent = `# ${r}`;
      b.className = r === room ? 'current' : '';
      b.onclick = () => r !== room && void join(r);
      return b;
    }),
  );
}

$('room-form').onsubmit = (e) => {
  e.preventDefault();
  const r = $('room-input').value.trim().replace(/[^A-Za-z0-9_.-]/g, '-');
  $('room-input').value = '';
  if (r && !rooms.includes(r)) rooms.push(r);
  if (r) void join(r);
};
$('send-form').onsubmit = (e) => {
  e.preventDefault();
  const t = $('text').value;
  if (!t) return;
  $('text').value = '';
  client.publish(`chat:${room}`, t).catch((err) => demo.errors.push(String(err)));
};

renderRooms();
client
  .connect()
  .then(() => join(room))
  .catch((e) => demo.errors.push(String(e)));
