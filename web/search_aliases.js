// Node search by the words users type (fp8, mxfp4, quantize, Z-Image, Wan): give the pack's node
// definitions their `search_aliases` where the server left them out. ComfyUI sends the field from
// the node schema only in versions that know it; frontends that index it search it either way.
// The words live in search_aliases.json, which the Python schema reads too.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "OnlineQuant.SearchAliases",
  async addCustomNodeDefs(defs) {
    let aliases;
    try {
      const res = await fetch(new URL("./search_aliases.json", import.meta.url));
      aliases = await res.json();
    } catch {
      return; // search by display name still works
    }
    for (const [id, words] of Object.entries(aliases)) {
      const def = defs[id];
      if (def && !(Array.isArray(def.search_aliases) && def.search_aliases.length)) def.search_aliases = words;
    }
  },
});
