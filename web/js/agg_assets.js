// Asymmetric Gradient Guidance: the example images shipped with the pack (web/assets/).
//
// The pack's workflows load some images the pack ships itself (the style image of the image-style
// workflow, the example clip of the video workflow). When a workflow whose LoadImage (or Load Video)
// names one of them is loaded and ComfyUI's input folder lacks the file, it is uploaded through
// ComfyUI's own /upload/image endpoint, exactly as the node's upload button would, and the node's
// file list and preview are refreshed. Only the files
// named in SHIPPED, only when missing, and never with "overwrite": a file of that name the user
// already has is left as it is.

import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

// The files in web/assets/ that workflows may name (tests/browser checks this list against the folder).
export const SHIPPED = ["agg_edit_mask.png", "agg_source_video.mp4", "agg_style.png"];
// The file widget of each loader the shipped files go into
const FILE_WIDGETS = { LoadImage: "image", LoadVideo: "file" };

const ASSETS = new URL("../assets/", import.meta.url);
const pending = new Map(); // file name -> Promise of the name the server stored it under (or null)

function imageWidgets(node) {
  const name = FILE_WIDGETS[node.type ?? node.comfyClass] ?? "image";
  return (node.widgets ?? []).filter((w) => w.name === name && w.type === "combo");
}

function comboValues(widget) {
  const values = widget.options?.values;
  return Array.isArray(values) ? values : null;
}

async function onServer(name) {
  const r = await api.fetchApi(`/view?filename=${encodeURIComponent(name)}&type=input`, {
    method: "HEAD",
    cache: "no-store",
  });
  return r.ok;
}

async function upload(name) {
  const res = await fetch(new URL(encodeURIComponent(name), ASSETS));
  if (!res.ok) throw new Error(`${name} is not in the pack's web/assets (${res.status})`);
  const blob = await res.blob();
  const body = new FormData();
  const kind = name.endsWith(".mp4") ? "video/mp4" : "image/png";
  body.append("image", new File([blob], name, { type: blob.type || kind }));
  body.append("type", "input");
  // No "overwrite": should a file of this name appear meanwhile, the server keeps it and stores
  // this one under a new name, which is then what the node loads.
  const r = await api.fetchApi("/upload/image", { method: "POST", body });
  if (r.status !== 200) throw new Error(`upload of ${name} failed: ${r.status} ${r.statusText}`);
  const stored = await r.json();
  return stored.subfolder ? `${stored.subfolder}/${stored.name}` : stored.name;
}

// The name to load `name` under: the server's own file when it has one, else the uploaded copy.
function provide(name) {
  if (!pending.has(name)) {
    const p = (async () => ((await onServer(name)) ? name : await upload(name)))();
    pending.set(name, p);
    // A later load checks again (the file may have been removed from the input folder since).
    p.finally(() => setTimeout(() => pending.delete(name), 0));
  }
  return pending.get(name);
}

function listEverywhere(stored) {
  const video = stored.endsWith(".mp4");
  for (const n of app.graph?._nodes ?? app.graph?.nodes ?? []) {
    if ((n.type === "LoadVideo") !== video) continue; // a clip is listed by Load Video only, a picture by the rest
    for (const w of imageWidgets(n)) {
      const values = comboValues(w);
      if (values && !values.includes(stored)) values.push(stored);
    }
  }
}

async function supply(node, widget) {
  const name = widget.value;
  try {
    const stored = await provide(name);
    if (!stored) return;
    listEverywhere(stored);
    if (widget.value === name) {
      widget.value = stored;
      widget.callback?.(stored); // what the upload button does: the preview follows the value
      // As a change made in the UI: newer frontends flag an image missing from the server when the graph
      // loads and clear that flag only on a widget change.
      node.onWidgetChanged?.(widget.name, stored, name, widget);
    }
    node.setDirtyCanvas?.(true, true);
  } catch (e) {
    console.warn(`[AGG] ${node.title ?? node.type}: could not supply the example image ${name}:`, e);
    app.extensionManager?.toast?.add({
      severity: "warn",
      summary: "AGG example image",
      detail: `${name} could not be copied into ComfyUI's input folder: ${e?.message ?? e}. ` +
        "Upload it with the node's upload button (it is in the pack's web/assets folder).",
      life: 10000,
    });
  }
}

app.registerExtension({
  name: "agg.assets",
  loadedGraphNode(node) {
    for (const widget of imageWidgets(node)) {
      if (SHIPPED.includes(widget.value)) supply(node, widget);
    }
  },
});
