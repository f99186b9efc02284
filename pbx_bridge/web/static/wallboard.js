// pbx-bridge wallboard: renders the daemon's Server-Sent Events (/wallboard/stream). Every value is
// put in the page with textContent, never as HTML. Ring and talk seconds count on between updates.
'use strict';

(function () {
  const TEXT = {
    zh: {
      title: '400热线 实时看板', unknown: '—', open: '营业中', closed: '非工作时间', holder: '客服手机保管人',
      connecting: '连接中…', connected: '已连接', lost_short: '连接中断',
      lost: '与 pbx-bridge 的连接已中断,正在自动重连……以下内容可能已过时',
      ringing: '振铃中', talking: '通话中', none_ringing: '暂无振铃来电', caller: '来电号码', who: '接听人',
      talk: '通话时长', rang: '振铃', did: '热线号码', today: '今日指标', stale: '数据暂未更新',
      k_calls: '来电', k_answer: '接通率', k_within: '三声内接听率', k_wait: '平均等待', k_handle: '平均处理时间',
      k_sheets: '录入率', callbacks: '待回拨', oldest: '最久已等', line: '线路状况', line_state: '线路',
      trunk: '中继', last_probe: '最近测拨', violations: '今日违规', updated: '更新于',
      stage_group: '坐席组', stage_escalation: '升级振铃', stage_mobile: '客服手机', stage_none: '接入中',
      rings: '声', ring_n: (n) => `第${n}声`, limit: (n) => `上限 ${n} 声`, seconds: '秒', minutes: '分钟', hours: '小时', over: '超过三响',
      mobile: '客服手机', reachable: '可达', unreachable: '不可达', none: '无',
      line_ok: '正常', line_failing: '故障', line_unknown: '未知', probe_ok: '成功', probe_failed: '失败',
      trigger_quiet: '久无来电', trigger_daily: '每日', trigger_manual: '手动', count_unit: '个',
      kind_ring_limit: '超过三响', kind_unanswered: '无人接听', kind_outbound_attempt: '400线路外拨',
      kind_complaint_overdue: '投诉超时',
    },
    en: {
      title: '400 hotline wallboard', unknown: '—', open: 'Open', closed: 'Closed', holder: 'Duty mobile holder',
      connecting: 'Connecting…', connected: 'Connected', lost_short: 'Connection lost',
      lost: 'Connection to pbx-bridge lost, reconnecting… what is shown may be out of date',
      ringing: 'Ringing', talking: 'In progress', none_ringing: 'No call ringing', caller: 'Caller', who: 'Answered by',
      talk: 'Talk', rang: 'Rang', did: 'Hotline', today: 'Today', stale: 'figures not updated',
      k_calls: 'Calls', k_answer: 'Answer rate', k_within: 'Within 3 rings', k_wait: 'Average wait',
      k_handle: 'Average handle time', k_sheets: 'Recording rate', callbacks: 'Callbacks due', oldest: 'oldest waiting',
      line: 'Line health', line_state: 'Line', trunk: 'Trunk', last_probe: 'Last probe', violations: 'Violations today',
      updated: 'Updated', stage_group: 'Agents', stage_escalation: 'Escalation', stage_mobile: 'Duty mobile',
      stage_none: 'Connecting', rings: 'rings', ring_n: (n) => `ring ${n}`,
      limit: (n) => `rings, limit ${n}`, seconds: 's', minutes: 'min', hours: 'h',
      over: 'Over 3 rings', mobile: 'duty mobile', reachable: 'reachable', unreachable: 'unreachable', none: 'none',
      line_ok: 'OK', line_failing: 'failing', line_unknown: 'unknown', probe_ok: 'ok', probe_failed: 'failed',
      trigger_quiet: 'quiet line', trigger_daily: 'daily', trigger_manual: 'manual', count_unit: '',
      kind_ring_limit: 'over the ring limit', kind_unanswered: 'unanswered', kind_outbound_attempt: 'outbound attempt',
      kind_complaint_overdue: 'complaint overdue',
    },
  };
  const query = new URLSearchParams(window.location.search);
  let lang = query.get('lang') || window.localStorage.getItem('wallboard-lang') || 'zh';
  if (!TEXT[lang]) lang = 'zh';
  const t = (key) => TEXT[lang][key] ?? key;
  // Why the hotline is open or closed today, as pbx_bridge/schedule.py words it, in the page's language.
  function reasonText(reason) {
    if (lang !== 'zh') return reason;
    let m;
    if (reason === 'weekly hours') return '正常营业时间';
    if ((m = /^weekly hours \(no holiday data for (\d+)\)$/.exec(reason))) return `正常营业时间(缺少${m[1]}年节假日数据)`;
    if ((m = /^statutory holiday(?:: (.+))?$/.exec(reason))) return m[1] ? `法定节假日:${m[1]}` : '法定节假日';
    if ((m = /^adjusted working day \(调休(?:: (.+))?\)$/.exec(reason))) return m[1] ? `调休工作日:${m[1]}` : '调休工作日';
    if ((m = /^override: (.+?)(?: \(database\))?$/.exec(reason))) return `临时调整:${m[1]}`;
    return reason;
  }

  // What tests and people may look at from the console: when each call was first seen, the state.
  const board = { seen: {}, connected: false, live: null, liveAt: 0, figures: null, lastMessage: 0, events: 0 };
  window.wallboard = board;

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  };

  function applyLanguage() {
    document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en';
    document.title = t('title');
    for (const node of document.querySelectorAll('[data-i18n]')) node.textContent = t(node.dataset.i18n);
    $('lang').textContent = lang === 'zh' ? 'EN' : '中文';
    renderLive();
    renderFigures();
    setConnection(board.connected ? 'ok' : document.body.dataset.connection);
  }

  function setConnection(state) {
    document.body.dataset.connection = state;
    board.connected = state === 'ok';
    $('lost').hidden = state !== 'lost';
    $('conn').textContent = state === 'ok' ? t('connected') : state === 'lost' ? t('lost_short') : t('connecting');
  }

  const pad = (n) => String(n).padStart(2, '0');
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return '—';
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} ${t('seconds')}`;
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
  }
  function minutes(value) {
    if (value === null || value === undefined) return '—';
    if (value < 60) return `${value} ${t('minutes')}`;
    return `${Math.floor(value / 60)} ${t('hours')} ${value % 60} ${t('minutes')}`;
  }
  const pct = (v) => (v === null || v === undefined ? '—' : `${Number(v).toFixed(1)}%`);
  const secs = (v) => (v === null || v === undefined ? '—' : `${Number(v).toFixed(1)} ${t('seconds')}`);

  function elapsed() { return (performance.now() - board.liveAt) / 1000; }

  function ringLevel(rings, max) {
    if (rings >= max) return 'alarm';
    if (rings >= max - 1 && max > 1) return 'warn';
    return 'calm';
  }

  function renderLive() {
    const live = board.live;
    if (!live) return;
    const period = live.ring.period, max = live.ring.max_rings;
    const ringing = live.calls.filter((c) => c.state === 'ringing');
    const talking = live.calls.filter((c) => c.state !== 'ringing');
    $('ringing-count').textContent = ringing.length;
    $('talking-count').textContent = talking.length;
    const list = $('ringing');
    list.replaceChildren();
    if (!ringing.length) list.append(el('p', 'empty', t('none_ringing')));
    for (const call of ringing) {
      const seconds = call.ring_seconds === null ? null : call.ring_seconds + elapsed();
      const rings = seconds === null ? 0 : Math.floor(seconds / period) + 1;
      const card = el('div', `card ${ringLevel(rings, max)}${rings > max ? ' over' : ''}`);
      card.dataset.id = call.id;
      card.dataset.rings = rings;
      card.dataset.state = 'ringing';
      const left = el('div');
      left.append(el('div', 'caller', call.caller || '—'));
      const meta = el('div', 'meta');
      meta.append(el('span', 'stage', t(`stage_${call.stage || 'none'}`)), document.createTextNode(` ${call.did} `),
        el('span', 'over-label', t('over')));
      left.append(meta);
      const ringsBox = el('div', 'rings', rings ? (lang === 'zh' ? t('ring_n')(rings) : rings) : '–');
      ringsBox.append(el('small', null, t('limit')(max)));
      card.append(left, ringsBox, el('div', 'seconds', seconds === null ? '' : `${seconds.toFixed(0)} ${t('seconds')}`));
      list.append(card);
    }
    const body = $('talking').tBodies[0];
    body.replaceChildren();
    for (const call of talking) {
      const row = el('tr');
      row.dataset.id = call.id;
      row.dataset.state = 'talking';
      const who = call.who ? (call.on_mobile ? `${call.who} (${t('mobile')})` : call.who) : '—';
      row.append(el('td', null, call.caller || '—'), el('td', 'who', who),
        el('td', null, call.talk_seconds === null ? '—' : duration(call.talk_seconds + elapsed())),
        el('td', null, call.ring_seconds === null ? '—' : `${call.ring_seconds.toFixed(1)} ${t('seconds')}`),
        el('td', null, call.did));
      body.append(row);
    }
    const routing = live.routing;
    const open = $('open');
    open.className = `badge ${routing ? (routing.open ? 'open' : 'closed') : 'unknown'}`;
    open.textContent = routing ? t(routing.open ? 'open' : 'closed') : '—';
    $('holder').textContent = routing && routing.holder ? routing.holder : '—';
    $('reason').textContent = routing && routing.reason ? reasonText(routing.reason) : '';
    const trunk = live.trunk;
    const trunkState = $('trunk-state');
    trunkState.textContent = !trunk ? '—' : trunk.reachable === true ? t('reachable')
      : trunk.reachable === false ? t('unreachable') : trunk.status;
    trunkState.className = trunk && trunk.reachable === false ? 'bad-text' : trunk && trunk.reachable ? 'ok-text' : '';
  }

  function setKpi(id, text, cls) {
    const value = $(id).querySelector('.value');
    value.textContent = text;
    value.className = `value${cls ? ` ${cls}` : ''}`;
  }

  function renderFigures() {
    const f = board.figures;
    if (!f) return;
    $('figures-state').hidden = f.ok !== false;
    if (!f.kpi) return;
    const k = f.kpi;
    $('day').textContent = f.day || '';
    setKpi('kpi-calls', k.calls ?? '—');
    setKpi('kpi-answer', pct(k.answer_rate_pct), k.answer_rate_pct === null ? '' : k.answer_rate_pct < 90 ? 'bad' : 'good');
    setKpi('kpi-within', pct(k.within_ring_limit_pct),
      k.within_ring_limit_pct === null ? '' : k.within_ring_limit_pct < 95 ? 'bad' : 'good');
    setKpi('kpi-wait', secs(k.avg_wait_seconds));
    setKpi('kpi-handle', duration(k.avg_talk_seconds));
    setKpi('kpi-sheets', pct(k.sheet_rate_pct), k.sheet_rate_pct === null ? '' : k.sheet_rate_pct < 100 ? 'bad' : 'good');
    $('callbacks-due').textContent = `${f.callbacks.due}${t('count_unit')}`;
    $('callbacks-due').className = f.callbacks.due ? 'big bad-text' : 'big ok-text';
    $('callbacks-oldest').textContent = f.callbacks.due ? minutes(f.callbacks.oldest_minutes) : '—';
    const line = f.line;
    const lineState = $('line-state');
    lineState.textContent = line ? t(`line_${line.state}`) : '—';
    lineState.className = line && line.state === 'failing' ? 'bad-text' : line && line.state === 'ok' ? 'ok-text' : '';
    let probe = '—';
    if (line && line.last_probe_at) {
      const outcome = line.last_probe_outcome === 'ok' ? t('probe_ok') : `${t('probe_failed')} (${line.last_probe_outcome})`;
      probe = `${line.last_probe_at} · ${t(`trigger_${line.last_probe_trigger}`)} · ${outcome}`;
    }
    $('last-probe').textContent = probe;
    const v = f.violations;
    $('violations-total').textContent = v.total;
    $('violations-total').className = `count${v.total ? ' bad-text' : ''}`;
    const kinds = $('violation-kinds');
    kinds.replaceChildren();
    if (!v.by_kind.length) kinds.append(el('li', 'ok-text', t('none')));
    for (const kind of v.by_kind) {
      kinds.append(el('li', null, `${lang === 'zh' ? kind.label : t(`kind_${kind.kind}`)} ${kind.count}`));
    }
    const latest = $('violation-latest');
    latest.replaceChildren();
    for (const item of v.latest) {
      const label = lang === 'zh' ? item.label : t(`kind_${item.kind}`);
      latest.append(el('li', null, `${(item.at || '').slice(11)}  ${label}  ${item.caller || ''}`));
    }
  }

  function tick() {
    const zone = board.live ? board.live.timezone : undefined;
    try {
      $('clock').textContent = new Date().toLocaleTimeString('en-GB', { timeZone: zone, hour12: false });
    } catch (error) {  // an unknown zone: the screen's own
      $('clock').textContent = new Date().toLocaleTimeString('en-GB', { hour12: false });
    }
    if (board.live && board.live.calls.length) renderLive();
    if (board.lastMessage && performance.now() - board.lastMessage > 25000 && board.connected) {
      setConnection('lost');  // nothing, not even a ping, for 25 s: the stream is dead even if the socket is not
      reconnect(0);
    }
  }

  let source = null;
  let retry = null;
  function received() {
    board.lastMessage = performance.now();
    board.events += 1;
    if (!board.connected) setConnection('ok');
  }
  function connect() {
    retry = null;
    source = new EventSource('/wallboard/stream');
    source.addEventListener('open', () => { received(); });
    source.addEventListener('live', (event) => {
      board.live = JSON.parse(event.data);
      board.liveAt = performance.now();
      for (const call of board.live.calls) if (!(call.id in board.seen)) board.seen[call.id] = Date.now();
      received();
      renderLive();
      try {
        $('updated').textContent = new Date().toLocaleTimeString('en-GB', { timeZone: board.live.timezone, hour12: false });
      } catch (error) {
        $('updated').textContent = new Date().toLocaleTimeString('en-GB', { hour12: false });
      }
    });
    source.addEventListener('figures', (event) => {
      board.figures = JSON.parse(event.data);
      received();
      renderFigures();
    });
    source.addEventListener('ping', () => { received(); });
    source.addEventListener('error', () => {
      setConnection('lost');
      if (source.readyState === EventSource.CLOSED) reconnect(3000);  // e.g. a 401 or 5xx: try again ourselves
    });
  }
  function reconnect(delay) {
    if (source) source.close();
    if (retry === null) retry = window.setTimeout(connect, delay);
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('lang').addEventListener('click', () => {
      lang = lang === 'zh' ? 'en' : 'zh';
      window.localStorage.setItem('wallboard-lang', lang);
      applyLanguage();
    });
    applyLanguage();
    setConnection('connecting');
    connect();
    window.setInterval(tick, 250);
    tick();
  });
})();
