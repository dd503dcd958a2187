// What a caller needs from a gateway response's headers: the request id to quote in a support
// ticket, the rate-limit state (x-ratelimit-*), which provider answered (x-gateway-*), and Retry-After.
using System;
using System.Collections.Generic;
using System.Linq;
using System.Net.Http;

namespace Gateway.Client
{
    public sealed class ResponseInfo
    {
        public int Status { get; private set; }
        public string RequestId { get; private set; }
        public TimeSpan? RetryAfter { get; private set; }
        /// <summary>x-ratelimit-*, x-gateway-* and retry-after, names in lower case.</summary>
        public SortedDictionary<string, string> Headers { get; private set; }

        public static ResponseInfo Of(HttpResponseMessage response)
        {
            var headers = new SortedDictionary<string, string>(StringComparer.Ordinal);
            foreach (KeyValuePair<string, IEnumerable<string>> header in response.Headers)
            {
                string name = header.Key.ToLowerInvariant();
                if (name.StartsWith("x-ratelimit-", StringComparison.Ordinal) || name.StartsWith("x-gateway-", StringComparison.Ordinal)
                    || name == "retry-after")
                    headers[name] = string.Join(", ", header.Value);
            }
            IEnumerable<string> ids;
            return new ResponseInfo
            {
                Status = (int)response.StatusCode,
                RequestId = response.Headers.TryGetValues("x-request-id", out ids) ? ids.FirstOrDefault() : null,
                RetryAfter = RetryAfterOf(response),
                Headers = headers,
            };
        }

        public IEnumerable<KeyValuePair<string, string>> RateLimits()
        {
            return Headers.Where(h => h.Key.StartsWith("x-ratelimit-", StringComparison.Ordinal) || h.Key == "retry-after");
        }

        static TimeSpan? RetryAfterOf(HttpResponseMessage response)
        {
            var value = response.Headers.RetryAfter;
            if (value == null) return null;
            if (value.Delta.HasValue) return value.Delta.Value;
            if (!value.Date.HasValue) return null;
            TimeSpan wait = value.Date.Value - DateTimeOffset.UtcNow; // the HTTP-date form (RFC 9110, 10.2.3)
            return wait > TimeSpan.Zero ? wait : TimeSpan.Zero;
        }
    }
}
