// Server-sent events, read line by line as they arrive (WHATWG HTML, "Parsing an event stream"):
// "data:" lines accumulate, a blank line dispatches the event, lines starting with ":" are comments.
using System.IO;
using System.Text;
using System.Threading.Tasks;

namespace Gateway.Client
{
    public sealed class SseReader
    {
        readonly TextReader _lines;

        public SseReader(TextReader lines) { _lines = lines; }

        /// <summary>The data of the next event, or null when the stream has ended.</summary>
        public async Task<string> NextDataAsync()
        {
            StringBuilder data = null;
            while (true)
            {
                string line = await _lines.ReadLineAsync().ConfigureAwait(false);
                if (line == null) return data == null ? null : data.ToString();
                if (line.Length == 0)
                {
                    if (data != null) return data.ToString();
                    continue;
                }
                if (line[0] == ':') continue;
                int colon = line.IndexOf(':');
                string field = colon < 0 ? line : line.Substring(0, colon);
                if (field != "data") continue; // event, id, retry: the gateway's streams carry only data
                string value = colon < 0 ? "" : line.Substring(colon + 1);
                if (value.Length > 0 && value[0] == ' ') value = value.Substring(1);
                if (data == null) data = new StringBuilder(value);
                else data.Append('\n').Append(value);
            }
        }
    }
}
