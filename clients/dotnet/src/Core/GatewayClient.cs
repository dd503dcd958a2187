// The gateway's routes over HttpClient: chat completions (whole and streamed), the task API and the
// usage view. Every call sends a fresh bearer token, and a 429 with Retry-After is retried after that wait.
using System;
using System.Collections.Generic;
using System.IO;
using System.Net.Http;
using System.Net.Http.Headers;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Gateway.Client
{
    public sealed class Reply
    {
        public ResponseInfo Response { get; internal set; }
        /// <summary>The parsed JSON body; for a stream, the last chunk that carried usage (or null).</summary>
        public object Body { get; internal set; }
        /// <summary>A stream's deltas joined.</summary>
        public string Content { get; internal set; }
    }

    public sealed class GatewayClient : IDisposable
    {
        // The Functions front end ends a response with no first byte after 230 s; wait a little longer.
        static readonly TimeSpan FirstByteTimeout = TimeSpan.FromSeconds(240);
        readonly HttpClient _http;
        readonly Uri _base;
        readonly ITokenSource _tokens;
        readonly TextWriter _log;

        /// <summary>Retries of a 429 that said Retry-After; longer waits than MaxRetryAfter are not waited for.</summary>
        public int MaxRetries { get; set; }
        public TimeSpan MaxRetryAfter { get; set; }
        /// <summary>Sent with every request (an APIM subscription key, for one).</summary>
        public IDictionary<string, string> ExtraHeaders { get; private set; }

        public GatewayClient(string baseUrl, ITokenSource tokens, TextWriter log, HttpMessageHandler handler = null)
        {
            _http = handler == null ? new HttpClient() : new HttpClient(handler);
            _http.Timeout = FirstByteTimeout;
            _base = new Uri(baseUrl.TrimEnd('/') + "/");
            _tokens = tokens;
            _log = log;
            MaxRetries = 2;
            MaxRetryAfter = TimeSpan.FromSeconds(60);
            ExtraHeaders = new Dictionary<string, string>();
        }

        public async Task<Reply> ChatAsync(string model, string prompt, CancellationToken cancel)
        {
            return await JsonAsync(HttpMethod.Post, "v1/chat/completions", ChatBody(model, prompt, false), cancel)
                .ConfigureAwait(false);
        }

        public async Task<Reply> GenerateAsync(string task, string prompt, string model, CancellationToken cancel)
        {
            var body = new Dictionary<string, object> { { "prompt", prompt }, { "task", task } };
            if (model != null) body["model"] = model;
            return await JsonAsync(HttpMethod.Post, "generate", body, cancel).ConfigureAwait(false);
        }

        public async Task<Reply> UsageAsync(CancellationToken cancel)
        {
            return await JsonAsync(HttpMethod.Get, "v1/usage", null, cancel).ConfigureAwait(false);
        }

        /// <summary>A streamed chat completion: onStart gets the headers, onDelta each piece of text as it arrives.</summary>
        public async Task<Reply> StreamChatAsync(string model, string prompt, Action<ResponseInfo> onStart,
                                                 Action<string> onDelta, CancellationToken cancel)
        {
            var reply = new Reply();
            var content = new StringBuilder();
            var body = ChatBody(model, prompt, true);
            body["stream_options"] = new Dictionary<string, object> { { "include_usage", true } };
            using (HttpResponseMessage response = await SendAsync(HttpMethod.Post, "v1/chat/completions", body, cancel)
                       .ConfigureAwait(false))
            using (Stream stream = await response.Content.ReadAsStreamAsync().ConfigureAwait(false))
            using (var lines = new StreamReader(stream, new UTF8Encoding(false)))
            {
                reply.Response = ResponseInfo.Of(response);
                onStart(reply.Response);
                var events = new SseReader(lines);
                while (true)
                {
                    string data = await events.NextDataAsync().ConfigureAwait(false);
                    if (data == null) throw GatewayException.Truncated(reply.Response);
                    if (data == "[DONE]") break;
                    object chunk = Json.Parse(data);
                    if (Json.At(chunk, "error") != null) throw GatewayException.FromBody(reply.Response, data, true);
                    if (Json.At(chunk, "usage") != null) reply.Body = chunk;
                    string delta = Json.At(chunk, "choices", 0, "delta", "content") as string;
                    if (string.IsNullOrEmpty(delta)) continue;
                    content.Append(delta);
                    onDelta(delta);
                }
            }
            reply.Content = content.ToString();
            return reply;
        }

        public void Dispose() { _http.Dispose(); }

        static Dictionary<string, object> ChatBody(string model, string prompt, bool stream)
        {
            var message = new Dictionary<string, object> { { "role", "user" }, { "content", prompt } };
            return new Dictionary<string, object>
            {
                { "model", model }, { "messages", new List<object> { message } }, { "stream", stream },
            };
        }

        async Task<Reply> JsonAsync(HttpMethod method, string path, object body, CancellationToken cancel)
        {
            using (HttpResponseMessage response = await SendAsync(method, path, body, cancel).ConfigureAwait(false))
            {
                string text = await response.Content.ReadAsStringAsync().ConfigureAwait(false);
                return new Reply { Response = ResponseInfo.Of(response), Body = Json.Parse(text) };
            }
        }

        /// <summary>A successful response with only its headers read; a gateway error becomes a GatewayException.</summary>
        async Task<HttpResponseMessage> SendAsync(HttpMethod method, string path, object body, CancellationToken cancel)
        {
            for (int attempt = 0; ; attempt++)
            {
                HttpRequestMessage request = await RequestAsync(method, path, body, cancel).ConfigureAwait(false);
                // ResponseHeadersRead: without it HttpClient buffers the whole body, and a stream arrives at its end.
                HttpResponseMessage response = await _http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancel)
                    .ConfigureAwait(false);
                if (response.IsSuccessStatusCode) return response;
                GatewayException error;
                using (response)
                {
                    string text = await response.Content.ReadAsStringAsync().ConfigureAwait(false);
                    error = GatewayException.FromBody(ResponseInfo.Of(response), text, false);
                }
                TimeSpan? wait = error.Response.RetryAfter;
                if (error.Status != 429 || !wait.HasValue || attempt >= MaxRetries || wait.Value > MaxRetryAfter) throw error;
                _log.WriteLine("{0}; waiting {1} s as Retry-After asks, then retry {2} of {3}", error.Describe(),
                               wait.Value.TotalSeconds, attempt + 1, MaxRetries);
                await Task.Delay(wait.Value, cancel).ConfigureAwait(false);
            }
        }

        async Task<HttpRequestMessage> RequestAsync(HttpMethod method, string path, object body, CancellationToken cancel)
        {
            var request = new HttpRequestMessage(method, new Uri(_base, path));
            string token = await _tokens.GetTokenAsync(cancel).ConfigureAwait(false);
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
            foreach (KeyValuePair<string, string> header in ExtraHeaders) request.Headers.Add(header.Key, header.Value);
            if (body != null) request.Content = new StringContent(Json.Write(body), new UTF8Encoding(false), "application/json");
            return request;
        }
    }
}
